//! The device's migration state machine, with the discipline of the VFIO
//! migration uAPI (linux/vfio.h `vfio_device_mig_state`): a fixed set of
//! states, only the arcs listed in [`allowed`], a failed transition leaves
//! the previous state or ERROR (never something in between), and ERROR is
//! left only by a reset.
//!
//! vhost-user mapping: RUNNING = at least one ring started; STOPPED = every
//! ring stopped (GET_VRING_BASE) or none started yet, the vhost-user
//! "suspended" state; SET_DEVICE_STATE_FD(SAVE, STOPPED) = STOPPED → SAVING
//! (VFIO's STOP_COPY), SET_DEVICE_STATE_FD(LOAD, STOPPED) = STOPPED →
//! RESUMING; CHECK_DEVICE_STATE ends the transfer: back to STOPPED on
//! success, on failure STOPPED (nothing was applied) or ERROR (applying a
//! checked state failed half way). A reset (RESET_DEVICE, RESET_OWNER,
//! disconnect) goes to STOPPED from anywhere: after a vhost-user reset no ring
//! runs, unlike VFIO where reset means RUNNING.

use std::fmt;

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

const LOG: &str = "migration";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigState {
    Running,
    Stopped,
    /// Device state is being written to the VMM (VFIO STOP_COPY).
    Saving,
    /// Device state is being read from the VMM.
    Resuming,
    Error,
}

impl MigState {
    pub const ALL: [MigState; 5] = [
        MigState::Running,
        MigState::Stopped,
        MigState::Saving,
        MigState::Resuming,
        MigState::Error,
    ];
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigState::Running => "RUNNING",
            MigState::Stopped => "STOPPED",
            MigState::Saving => "SAVING",
            MigState::Resuming => "RESUMING",
            MigState::Error => "ERROR",
        })
    }
}

/// The defined arcs (besides reset and failure, which are not requests).
pub fn allowed(from: MigState, to: MigState) -> bool {
    use MigState::*;
    matches!(
        (from, to),
        (Running, Stopped)
            | (Stopped, Running)
            | (Stopped, Saving)
            | (Saving, Stopped)
            | (Stopped, Resuming)
            | (Resuming, Stopped)
    )
}

/// Direction of a state transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Save,
    Load,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Save => "SAVE",
            Direction::Load => "LOAD",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("device state transition {from} -> {to} is not allowed")]
    Refused { from: MigState, to: MigState },
    #[error("device is in ERROR ({why}); only a reset leaves it (refused -> {to})")]
    InError { to: MigState, why: String },
    #[error("device state transition {from} -> {to} failed: {why} (device now {now})")]
    Failed {
        from: MigState,
        to: MigState,
        why: String,
        now: MigState,
    },
    #[error("CHECK_DEVICE_STATE without a state transfer (device is {0})")]
    NoTransfer(MigState),
    #[error("device state {direction} failed: {why} (device now {now})")]
    TransferFailed {
        direction: Direction,
        why: String,
        now: MigState,
    },
}

/// How bad a failure is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing changed: stay in (or go back to) the previous stable state.
    Recoverable,
    /// State may be half applied: ERROR until reset.
    Fatal,
}

#[derive(Debug)]
pub struct MigrationState {
    state: MigState,
    /// Why the device is in ERROR.
    error: Option<String>,
}

impl Default for MigrationState {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationState {
    /// A fresh device: no ring runs.
    pub fn new() -> Self {
        MigrationState {
            state: MigState::Stopped,
            error: None,
        }
    }

    pub fn state(&self) -> MigState {
        self.state
    }

    /// Why the device is in ERROR, if it is.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The current state, if the arc from it to `to` may be taken.
    fn arc_to(&self, to: MigState) -> Result<MigState, TransitionError> {
        let from = self.state;
        if from == MigState::Error {
            return Err(TransitionError::InError {
                to,
                why: self.error.clone().unwrap_or_default(),
            });
        }
        if !allowed(from, to) {
            return Err(TransitionError::Refused { from, to });
        }
        Ok(from)
    }

    /// Request the arc `state -> to`.
    pub fn transition(&mut self, to: MigState) -> Result<(), TransitionError> {
        let from = self.arc_to(to)?;
        log::debug!(target: LOG, "device state {from} -> {to}");
        self.state = to;
        Ok(())
    }

    /// Run `op` as the transition to `to`: the state becomes `to` only if it
    /// succeeds; a failure leaves the previous state (Recoverable) or ERROR.
    pub fn run<T>(
        &mut self,
        to: MigState,
        op: impl FnOnce() -> Result<T, (Failure, String)>,
    ) -> Result<T, TransitionError> {
        let from = self.arc_to(to)?;
        match op() {
            Ok(v) => {
                self.state = to;
                Ok(v)
            }
            Err((kind, why)) => {
                self.fail(kind, &why);
                Err(TransitionError::Failed {
                    from,
                    to,
                    why,
                    now: self.state,
                })
            }
        }
    }

    /// A failure outside a requested arc (e.g. the device broke while
    /// SAVING): Recoverable goes back to the stable state the current one
    /// came from (STOPPED for SAVING/RESUMING), Fatal to ERROR.
    pub fn fail(&mut self, kind: Failure, why: &str) {
        let from = self.state;
        match kind {
            Failure::Recoverable => {
                if matches!(from, MigState::Saving | MigState::Resuming) {
                    self.state = MigState::Stopped;
                }
                log::warn!(target: LOG, "device state {from}: {why}; now {}", self.state);
            }
            Failure::Fatal => {
                log::error!(target: LOG, "device state {from}: {why}; device now in ERROR until reset");
                self.state = MigState::Error;
                self.error = Some(why.to_string());
            }
        }
    }

    /// RESET_DEVICE / RESET_OWNER / VMM gone: the only way out of ERROR.
    pub fn reset(&mut self) {
        if self.state != MigState::Stopped {
            log::debug!(target: LOG, "device state {} -> STOPPED (reset)", self.state);
        }
        self.state = MigState::Stopped;
        self.error = None;
    }

    // --- vhost-user events --------------------------------------------------

    /// A ring started (first one: STOPPED -> RUNNING; more: stays RUNNING).
    pub fn ring_started(&mut self) -> Result<(), TransitionError> {
        if self.state == MigState::Running {
            return Ok(());
        }
        self.transition(MigState::Running)
    }

    /// Every ring is stopped now (RUNNING -> STOPPED; already STOPPED: no-op).
    pub fn all_rings_stopped(&mut self) -> Result<(), TransitionError> {
        if self.state == MigState::Stopped {
            return Ok(());
        }
        self.transition(MigState::Stopped)
    }

    /// SET_DEVICE_STATE_FD. A transfer still open (the VMM gave up on it
    /// without CHECK_DEVICE_STATE, e.g. a cancelled migration) is aborted
    /// first: SAVING/RESUMING -> STOPPED, then the new arc.
    pub fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
    ) -> Result<Direction, TransitionError> {
        let dir = match direction {
            VhostTransferStateDirection::SAVE => Direction::Save,
            VhostTransferStateDirection::LOAD => Direction::Load,
        };
        // STOPPED is the only phase vhost-user defines (and the only one the
        // vhost crate parses).
        match phase {
            VhostTransferStatePhase::STOPPED => {}
        }
        if matches!(self.state, MigState::Saving | MigState::Resuming) {
            log::warn!(target: LOG, "new state transfer while {}: the previous one is abandoned", self.state);
            self.transition(MigState::Stopped)?;
        }
        let to = match dir {
            Direction::Save => MigState::Saving,
            Direction::Load => MigState::Resuming,
        };
        self.transition(to)?;
        Ok(dir)
    }

    /// Which transfer is open, if any.
    pub fn transfer(&self) -> Option<Direction> {
        match self.state {
            MigState::Saving => Some(Direction::Save),
            MigState::Resuming => Some(Direction::Load),
            _ => None,
        }
    }

    /// CHECK_DEVICE_STATE with the transfer's outcome. `Ok(())` = the whole
    /// stream was written (save) or loaded, validated and applied (load).
    pub fn check_device_state(
        &mut self,
        outcome: Result<(), (Failure, String)>,
    ) -> Result<(), TransitionError> {
        let Some(direction) = self.transfer() else {
            return Err(match self.state {
                MigState::Error => TransitionError::InError {
                    to: MigState::Stopped,
                    why: self.error.clone().unwrap_or_default(),
                },
                s => TransitionError::NoTransfer(s),
            });
        };
        match outcome {
            Ok(()) => self.transition(MigState::Stopped),
            Err((kind, why)) => {
                self.fail(kind, &why);
                Err(TransitionError::TransferFailed {
                    direction,
                    why,
                    now: self.state,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    fn at(s: MigState) -> MigrationState {
        MigrationState {
            state: s,
            error: (s == Error).then(|| "broken".to_string()),
        }
    }

    #[test]
    fn only_defined_arcs() {
        let defined = [
            (Running, Stopped),
            (Stopped, Running),
            (Stopped, Saving),
            (Saving, Stopped),
            (Stopped, Resuming),
            (Resuming, Stopped),
        ];
        for from in MigState::ALL {
            for to in MigState::ALL {
                let mut m = at(from);
                let r = m.transition(to);
                if defined.contains(&(from, to)) {
                    assert_eq!(r, Ok(()), "{from} -> {to}");
                    assert_eq!(m.state(), to);
                } else {
                    let e = r.unwrap_err();
                    assert_eq!(m.state(), from, "refused arc changed the state");
                    let msg = e.to_string();
                    assert!(msg.contains(&to.to_string()), "{msg}");
                    if from != Error {
                        assert_eq!(e, TransitionError::Refused { from, to });
                        assert!(msg.contains(&format!("{from} -> {to}")), "{msg}");
                    }
                }
            }
        }
    }

    #[test]
    fn failures_leave_previous_state_or_error() {
        let mut m = at(Stopped);
        let r = m.run(Saving, || {
            Err::<(), _>((Failure::Recoverable, "pipe closed".into()))
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("STOPPED -> SAVING failed: pipe closed"), "{e}");
        assert_eq!(m.state(), Stopped);

        let r = m.run(Resuming, || {
            Err::<(), _>((Failure::Fatal, "half applied".into()))
        });
        assert!(r.unwrap_err().to_string().contains("device now ERROR"));
        assert_eq!(m.state(), Error);
        assert_eq!(m.error(), Some("half applied"));

        assert_eq!(
            m.run(Running, || Ok::<_, (Failure, String)>(7))
                .unwrap_err(),
            TransitionError::InError {
                to: Running,
                why: "half applied".into()
            }
        );
        m.reset();
        assert_eq!(m.state(), Stopped);
        assert_eq!(m.error(), None);
        assert_eq!(m.run(Running, || Ok::<_, (Failure, String)>(7)), Ok(7));
        assert_eq!(m.state(), Running);
    }

    #[test]
    fn error_is_left_only_by_reset() {
        let mut m = at(Running);
        m.fail(Failure::Fatal, "device lost");
        for to in MigState::ALL {
            assert!(matches!(
                m.transition(to),
                Err(TransitionError::InError { .. })
            ));
        }
        assert!(m.ring_started().is_err());
        assert!(m.all_rings_stopped().is_err());
        assert!(m
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED
            )
            .is_err());
        assert!(matches!(
            m.check_device_state(Ok(())),
            Err(TransitionError::InError { .. })
        ));
        assert_eq!(m.state(), Error);
        m.reset();
        assert_eq!(m.state(), Stopped);
    }

    #[test]
    fn vhost_user_save_sequence() {
        let mut m = MigrationState::new();
        m.ring_started().unwrap();
        m.ring_started().unwrap();
        assert_eq!(m.state(), Running);
        // The VMM must stop the rings first.
        let e = m
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
            )
            .unwrap_err();
        assert_eq!(
            e,
            TransitionError::Refused {
                from: Running,
                to: Saving
            }
        );
        m.all_rings_stopped().unwrap();
        let d = m
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
            )
            .unwrap();
        assert_eq!(d, Direction::Save);
        assert_eq!(m.transfer(), Some(Direction::Save));
        // No ring may start while saving.
        assert!(m.ring_started().is_err());
        m.check_device_state(Ok(())).unwrap();
        assert_eq!(m.state(), Stopped);
        // A second CHECK has no transfer to check.
        assert_eq!(
            m.check_device_state(Ok(())),
            Err(TransitionError::NoTransfer(Stopped))
        );
        // The source may resume the guest (migration failed later on).
        m.ring_started().unwrap();
        assert_eq!(m.state(), Running);
    }

    #[test]
    fn vhost_user_load_failures() {
        let mut m = MigrationState::new();
        m.set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
        )
        .unwrap();
        assert_eq!(m.state(), Resuming);
        let e = m
            .check_device_state(Err((
                Failure::Recoverable,
                "unknown record type 0x99".into(),
            )))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("LOAD failed: unknown record type 0x99"),
            "{msg}"
        );
        assert!(msg.contains("device now STOPPED"), "{msg}");
        assert_eq!(m.state(), Stopped);

        m.set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
        )
        .unwrap();
        let e = m
            .check_device_state(Err((Failure::Fatal, "backend refused vring base".into())))
            .unwrap_err();
        assert!(e.to_string().contains("device now ERROR"));
        assert_eq!(m.state(), Error);
    }

    #[test]
    fn a_new_transfer_abandons_the_open_one() {
        let mut m = MigrationState::new();
        m.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
        )
        .unwrap();
        let d = m
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
            )
            .unwrap();
        assert_eq!(d, Direction::Load);
        assert_eq!(m.state(), Resuming);
    }
}
