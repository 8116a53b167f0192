//! Tests of the migration mechanisms that need more than one file.

mod stream;
