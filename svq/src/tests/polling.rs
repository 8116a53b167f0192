//! Notification suppression while a worker polls: each rule is a test that
//! fails without it. A polling pass is one `handle_device_call`.

use super::harness::USED_GPA;
use super::{Fixture, F_EVENT_IDX};

const NO_NOTIFY: u16 = 1; // VRING_USED_F_NO_NOTIFY
const NO_INTERRUPT: u16 = 1; // VRING_AVAIL_F_NO_INTERRUPT

/// What a split-ring driver without EVENT_IDX checks before kicking.
fn guest_would_kick(f: &Fixture) -> bool {
    f.drv.used_flags(&f.mem) & NO_NOTIFY == 0
}

/// `vring_need_event` as a driver under EVENT_IDX evaluates it.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[test]
fn polling_tells_the_guest_not_to_kick_and_asks_again_before_sleeping() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.suppress_notifications(&f.mem).unwrap();
    assert!(f.svq.notifications_suppressed());
    assert!(!guest_would_kick(&f), "NO_NOTIFY while polled");
    f.svq.flush_dirty(&f.log);
    assert!(f.log.covers(USED_GPA, 2), "the flags write is logged");

    // Chains added now are relayed by a pass, not by a kick.
    f.add(&[(64, true)], false);
    f.add(&[(64, true)], false);
    f.call().unwrap();
    assert_eq!(f.dev.take_all(&f.tree), 2);
    assert!(!guest_would_kick(&f), "a pass must not re-arm kicks");

    // Going to sleep with nothing pending.
    f.log = Default::default();
    assert!(!f.svq.request_notifications(&f.mem).unwrap());
    assert!(guest_would_kick(&f));
    f.svq.flush_dirty(&f.log);
    assert!(f.log.covers(USED_GPA, 2));
}

#[test]
fn a_chain_added_while_kicks_were_off_keeps_the_poller_awake() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.suppress_notifications(&f.mem).unwrap();
    f.call().unwrap();
    // The guest saw NO_NOTIFY and did not kick for this one.
    f.add(&[(64, true)], false);
    assert!(
        f.svq.request_notifications(&f.mem).unwrap(),
        "sleeping now would strand the chain"
    );
    f.call().unwrap();
    assert_eq!(f.dev.take_all(&f.tree), 1);
}

#[test]
fn polling_under_event_idx_leaves_avail_event_behind() {
    let mut f = Fixture::new(16, 16, F_EVENT_IDX, 0);
    f.add(&[(64, true)], false);
    f.kick().unwrap();
    assert_eq!(f.drv.avail_event(&f.mem), 1, "event mode asks for chain 1");
    f.svq.suppress_notifications(&f.mem).unwrap();
    for _ in 0..3 {
        f.add(&[(64, true)], false);
        f.call().unwrap();
    }
    assert_eq!(f.dev.take_all(&f.tree), 4);
    let event = f.drv.avail_event(&f.mem);
    assert_eq!(event, 1, "avail_event must not follow a polled ring");
    assert!(
        !need_event(event, 5, 4),
        "the guest would not kick for chain 5"
    );
    assert!(!f.svq.request_notifications(&f.mem).unwrap());
    assert_eq!(f.drv.avail_event(&f.mem), 4, "kick me for the next chain");
    f.svq.flush_dirty(&f.log);
    assert!(
        f.log.covers(USED_GPA + 4 + 8 * 16, 2),
        "avail_event is logged"
    );
    // NO_NOTIFY means nothing to an EVENT_IDX driver: left alone.
    assert_eq!(f.drv.used_flags(&f.mem), 0);
}

#[test]
fn polling_tells_the_device_not_to_interrupt() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.suppress_notifications(&f.mem).unwrap();
    assert_eq!(f.dev.avail_flags(), NO_INTERRUPT);
    f.add(&[(64, true)], false);
    f.call().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    f.call().unwrap();
    assert_eq!(f.drv.collect(&f.mem).len(), 1, "a pass completes it");
    assert_eq!(f.dev.avail_flags(), NO_INTERRUPT, "still polled");

    // The device completes while the poller decides to sleep.
    f.add(&[(64, true)], false);
    f.call().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    assert!(
        f.svq.request_notifications(&f.mem).unwrap(),
        "a used entry no interrupt announces"
    );
    assert_eq!(f.dev.avail_flags(), 0);
    f.call().unwrap();
    assert_eq!(f.drv.collect(&f.mem).len(), 1);
}

#[test]
fn polling_under_device_event_idx_leaves_used_event_behind() {
    let mut f = Fixture::new(16, 16, 0, F_EVENT_IDX);
    f.svq.suppress_notifications(&f.mem).unwrap();
    assert_eq!(f.dev.avail_flags(), 0, "EVENT_IDX devices ignore the flags");
    for _ in 0..3 {
        f.add(&[(64, true)], false);
    }
    f.call().unwrap();
    f.dev.take_all(&f.tree);
    for _ in 0..3 {
        f.dev.complete(0, 64, 1, &f.mem, &f.tree);
        f.call().unwrap();
    }
    let event = f.dev.used_event();
    assert_eq!(event, 0, "used_event must not follow a polled ring");
    assert!(!need_event(event, 4, 3), "the device would not interrupt");
    assert!(!f.svq.request_notifications(&f.mem).unwrap());
    assert_eq!(f.dev.used_event(), 3, "interrupt at the next used entry");
}

/// Suppression toward the guest and the device does not change whom the
/// SVQ notifies: it signals the guest only when the guest asked, kicks the
/// device only when the device asked, and once per pass however many
/// chains moved.
#[test]
fn a_pass_notifies_once_and_only_whom_asked() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.suppress_notifications(&f.mem).unwrap();
    for _ in 0..4 {
        f.add(&[(64, true)], false);
    }
    let out = f.call().unwrap();
    assert!(
        out.kick_device && !out.notify_guest,
        "one kick for 4 chains"
    );
    assert_eq!(f.dev.take_all(&f.tree), 4);
    for _ in 0..4 {
        f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    }
    for _ in 0..4 {
        f.add(&[(64, true)], false);
    }
    let out = f.call().unwrap();
    assert!(
        out.notify_guest && out.kick_device,
        "4 completions, 4 chains"
    );
    assert_eq!(f.drv.collect(&f.mem).len(), 4);

    // The guest turned interrupts off, the device turned kicks off.
    f.drv.set_avail_flags(&f.mem, NO_INTERRUPT);
    f.dev.set_used_flags(NO_NOTIFY);
    f.dev.take_all(&f.tree);
    for _ in 0..4 {
        f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    }
    f.add(&[(64, true)], false);
    let out = f.call().unwrap();
    assert!(!out.notify_guest, "the guest did not ask");
    assert!(!out.kick_device, "the device did not ask");
    assert_eq!(f.drv.collect(&f.mem).len(), 4);
    assert_eq!(f.dev.take_all(&f.tree), 1);
}

#[test]
fn a_pass_honours_used_event_while_polling() {
    let mut f = Fixture::new(16, 16, F_EVENT_IDX, 0);
    f.svq.suppress_notifications(&f.mem).unwrap();
    f.drv.set_used_event(&f.mem, 2); // interrupt when used idx passes 2
    for _ in 0..4 {
        f.add(&[(64, true)], false);
    }
    f.call().unwrap();
    f.dev.take_all(&f.tree);
    f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    assert!(!f.call().unwrap().notify_guest, "0 -> 2 does not pass 2");
    f.dev.complete(0, 64, 1, &f.mem, &f.tree);
    assert!(f.call().unwrap().notify_guest, "2 -> 3 passes 2");
}

/// The ring goes back to a device in passthrough (or to the next SVQ): the
/// guest must not keep a NO_NOTIFY that nothing will clear.
#[test]
fn a_stopped_queue_still_asks_the_guest_to_kick_again() {
    let mut f = Fixture::new(16, 16, 0, 0);
    f.svq.suppress_notifications(&f.mem).unwrap();
    f.add(&[(64, true)], false);
    f.call().unwrap();
    f.svq.stop(&f.mem, 0).unwrap();
    f.svq.request_notifications(&f.mem).unwrap();
    assert!(guest_would_kick(&f));
    assert!(!f.svq.notifications_suppressed());
}
