//! Built-in software virtio-net device (work in progress).
