//! Scenario tests (the kernel selftests in model form) and a property test
//! that runs random operation sequences against the model's invariants and
//! the redirection rule.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use suture_model::{
    CallbackKind, Code, DisableKind, Func, Model, ModelError, Object, Patch, SiteMode, State,
    Target, ThreadState,
};

const F: u64 = 0x1000;
const G: u64 = 0x2000;
const H: u64 = 0x3000;

fn patch(name: &str, replace: bool, funcs: &[(u64, u64)]) -> Patch {
    let mut p = Patch::new(name, replace);
    let mut o = Object::new(None, "/bin/target", None);
    for (old, new) in funcs {
        o.funcs.push(Func::new(format!("f{old:x}"), 0, *old, *new));
    }
    p.objects.push(o);
    p
}

fn enable_now(m: &mut Model, p: Patch) {
    m.begin_enable(p, &[1, 2]).unwrap();
    m.switch_thread(1);
    m.switch_thread(2);
    m.complete().unwrap();
    m.check_invariants().unwrap();
}

fn disable_now(m: &mut Model, name: &str) {
    m.begin_disable(name, &[1, 2]).unwrap();
    m.switch_thread(1);
    m.switch_thread(2);
    m.complete().unwrap();
    m.check_invariants().unwrap();
}

#[test]
fn basic_patch_and_unpatch() {
    let mut m = Model::new();
    m.begin_enable(patch("p1", false, &[(F, 0xa)]), &[1, 2])
        .unwrap();
    m.check_invariants().unwrap();
    assert_eq!(
        m.site_mode(F),
        SiteMode::Dispatch {
            patched: Code::New(0xa),
            unpatched: Code::Original
        }
    );
    assert_eq!(m.code_for(F, ThreadState::Unpatched), Code::Original);
    assert!(m.switch_thread(1));
    assert!(!m.switch_thread(1));
    assert_eq!(m.thread_state(1), ThreadState::Patched);
    assert!(matches!(m.complete(), Err(ModelError::Pending { .. })));
    m.switch_thread(2);
    let c = m.complete().unwrap();
    assert_eq!(c.target, Target::Patched);
    assert_eq!(m.site_mode(F), SiteMode::Jump(Code::New(0xa)));
    assert_eq!(m.thread_state(1), ThreadState::Idle);
    disable_now(&mut m, "p1");
    assert_eq!(m.site_mode(F), SiteMode::Original);
    assert!(m.patches().is_empty());
    assert!(m.sites().is_empty());
}

#[test]
fn stacked_patches_upper_disabled_first_and_lower_first() {
    let mut m = Model::new();
    enable_now(&mut m, patch("p1", false, &[(F, 0xa)]));
    enable_now(&mut m, patch("p2", false, &[(F, 0xb)]));
    assert_eq!(m.site_mode(F), SiteMode::Jump(Code::New(0xb)));
    // Patching on top replaces the entry below it.
    let mut m2 = m.clone();
    disable_now(&mut m2, "p2");
    assert_eq!(m2.site_mode(F), SiteMode::Jump(Code::New(0xa)));
    // Disabling the lower one keeps the top in effect.
    m.begin_disable("p1", &[1]).unwrap();
    assert_eq!(m.replaced_code(), vec![(F, Code::New(0xa))]);
    assert_eq!(m.site_mode(F), SiteMode::Jump(Code::New(0xb)));
    m.switch_thread(1);
    m.complete().unwrap();
    assert_eq!(m.site_mode(F), SiteMode::Jump(Code::New(0xb)));
    assert_eq!(m.patches().len(), 1);
}

#[test]
fn replaced_code_while_patching_is_the_entry_below() {
    let mut m = Model::new();
    enable_now(&mut m, patch("p1", false, &[(F, 0xa)]));
    m.begin_enable(patch("p2", false, &[(F, 0xb), (G, 0xc)]), &[1])
        .unwrap();
    assert_eq!(
        m.replaced_code(),
        vec![(F, Code::New(0xa)), (G, Code::Original)]
    );
}

#[test]
fn busy_and_reverse() {
    let mut m = Model::new();
    m.begin_enable(patch("p1", false, &[(F, 0xa)]), &[1, 2])
        .unwrap();
    assert!(matches!(
        m.begin_enable(patch("p2", false, &[(G, 0xb)]), &[1]),
        Err(ModelError::Busy { .. })
    ));
    m.switch_thread(1);
    assert_eq!(m.begin_disable("p1", &[1, 2]), Ok(DisableKind::Reversed));
    m.check_invariants().unwrap();
    let t = m.transition().unwrap();
    assert_eq!(t.target, Target::Unpatched);
    // Thread 2 never switched: it is already in the new target.
    assert_eq!(m.pending(), vec![1]);
    assert!(!m.patch("p1").unwrap().enabled);
    m.switch_thread(1);
    let c = m.complete().unwrap();
    assert_eq!(c.callbacks, vec![]);
    assert!(m.patches().is_empty());
    assert_eq!(m.site_mode(F), SiteMode::Original);
}

#[test]
fn atomic_replace_with_nops_removed_at_completion() {
    let mut m = Model::new();
    enable_now(&mut m, patch("p1", false, &[(F, 0xa), (G, 0xb)]));
    enable_now(&mut m, patch("p2", false, &[(H, 0xc)]));
    m.begin_enable(patch("p3", true, &[(F, 0xd)]), &[1, 2])
        .unwrap();
    m.check_invariants().unwrap();
    let p3 = m.patch("p3").unwrap();
    let nops: BTreeSet<u64> = p3.funcs().filter(|f| f.nop).map(|f| f.old_addr).collect();
    assert_eq!(nops, BTreeSet::from([G, H]));
    // Switched threads run the original g; the others still run p1's g.
    assert_eq!(m.code_for(G, ThreadState::Patched), Code::Original);
    assert_eq!(m.code_for(G, ThreadState::Unpatched), Code::New(0xb));
    // A thread inside p1's g holds the transition.
    assert!(m.replaced_code().contains(&(G, Code::New(0xb))));
    m.switch_thread(1);
    m.switch_thread(2);
    let c = m.complete().unwrap();
    m.check_invariants().unwrap();
    assert_eq!(c.nops_removed.len(), 2);
    assert_eq!(
        c.removed
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["p1", "p2"]
    );
    assert_eq!(m.patches().len(), 1);
    assert_eq!(m.site_mode(G), SiteMode::Original);
    assert_eq!(m.site_mode(H), SiteMode::Original);
    assert_eq!(m.site_mode(F), SiteMode::Jump(Code::New(0xd)));
    assert_eq!(m.sites(), vec![F]);
    assert!(m.patch("p3").unwrap().funcs().all(|f| !f.nop));
    // Non-replace patches stack on it; disabling it restores everything.
    enable_now(&mut m, patch("p4", false, &[(G, 0xe)]));
    disable_now(&mut m, "p3");
    assert_eq!(m.site_mode(F), SiteMode::Original);
    assert_eq!(m.site_mode(G), SiteMode::Jump(Code::New(0xe)));
}

#[test]
fn reversing_a_replace_leaves_replaced_patches_in_effect() {
    let mut m = Model::new();
    enable_now(&mut m, patch("p1", false, &[(F, 0xa), (G, 0xb)]));
    let before = m.site_modes();
    m.begin_enable(patch("p3", true, &[(F, 0xd)]), &[1, 2])
        .unwrap();
    m.switch_thread(1);
    m.begin_disable("p3", &[1, 2]).unwrap();
    m.switch_thread(1);
    m.complete().unwrap();
    m.check_invariants().unwrap();
    assert_eq!(m.site_modes(), before);
    assert!(m.patch("p1").unwrap().enabled);
}

#[test]
fn force_marks_every_patch() {
    let mut m = Model::new();
    enable_now(&mut m, patch("p1", false, &[(F, 0xa)]));
    m.begin_enable(patch("p2", false, &[(G, 0xb)]), &[7, 8])
        .unwrap();
    assert_eq!(m.force().unwrap(), vec![7, 8]);
    m.complete().unwrap();
    assert!(m.patches().iter().all(|p| p.forced));
}

#[test]
fn states_compatibility() {
    let mut m = Model::new();
    let mut p1 = patch("p1", false, &[(F, 0xa)]);
    p1.states.push(State {
        id: 5,
        version: 2,
        desc_addr: 0,
    });
    enable_now(&mut m, p1);
    let mut older = patch("p2", true, &[(F, 0xb)]);
    older.states.push(State {
        id: 5,
        version: 1,
        desc_addr: 0,
    });
    let e = m.check_enable(&older).unwrap_err();
    assert!(e.to_string().contains("is not compatible"), "{e}");
    let missing = patch("p3", true, &[(F, 0xb)]);
    assert!(m.check_enable(&missing).is_err());
    let plain = patch("p4", false, &[(G, 0xb)]);
    assert!(m.check_enable(&plain).is_ok());
    let mut newer = patch("p5", true, &[(F, 0xb)]);
    newer.states.push(State {
        id: 5,
        version: 3,
        desc_addr: 0,
    });
    assert!(m.check_enable(&newer).is_ok());
}

#[test]
fn callbacks_reported_at_completion() {
    let mut m = Model::new();
    let mut p = patch("p1", false, &[(F, 0xa)]);
    p.objects[0].callbacks = vec![
        (CallbackKind::PostPatch, 0x77),
        (CallbackKind::PostUnpatch, 0x78),
    ];
    m.begin_enable(p, &[]).unwrap();
    let c = m.complete().unwrap();
    assert_eq!(
        c.callbacks,
        vec![("p1".into(), None, CallbackKind::PostPatch, 0x77)]
    );
    m.begin_disable("p1", &[]).unwrap();
    let c = m.complete().unwrap();
    assert_eq!(
        c.callbacks,
        vec![("p1".into(), None, CallbackKind::PostUnpatch, 0x78)]
    );
}

#[test]
fn refusals() {
    let mut m = Model::new();
    enable_now(&mut m, patch("p1", false, &[(F, 0xa)]));
    assert!(matches!(
        m.begin_enable(patch("p1", false, &[(G, 0xa)]), &[]),
        Err(ModelError::AlreadyApplied(_))
    ));
    assert!(matches!(
        m.begin_enable(patch("d", false, &[(G, 0xa), (G, 0xb)]), &[]),
        Err(ModelError::DuplicateFunc { .. })
    ));
    assert!(matches!(
        m.begin_disable("nope", &[]),
        Err(ModelError::NoSuchPatch(_))
    ));
    assert!(matches!(m.complete(), Err(ModelError::NoTransition)));
    let s = serde_json::to_string(&m).unwrap();
    let back: Model = serde_json::from_str(&s).unwrap();
    assert_eq!(back, m);
}

#[derive(Debug, Clone)]
enum Op {
    Enable { funcs: Vec<u8>, replace: bool },
    Disable(usize),
    Switch(i32),
    Complete,
    Force,
    NewThread(i32),
    NewPendingThread(i32),
    ExitThread(i32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (prop::collection::vec(0u8..5, 1..4), any::<bool>())
            .prop_map(|(funcs, replace)| Op::Enable { funcs, replace }),
        (0usize..4).prop_map(Op::Disable),
        (1i32..5).prop_map(Op::Switch),
        Just(Op::Complete),
        Just(Op::Force),
        (1i32..7).prop_map(Op::NewThread),
        (1i32..7).prop_map(Op::NewPendingThread),
        (1i32..7).prop_map(Op::ExitThread),
    ]
}

/// Code per site with the transition patch absent and present.
type Sides = (BTreeMap<u64, Code>, BTreeMap<u64, Code>);

fn idle_codes(m: &Model, addrs: &BTreeSet<u64>) -> BTreeMap<u64, Code> {
    addrs
        .iter()
        .map(|a| (*a, m.code_for(*a, ThreadState::Idle)))
        .collect()
}

fn finished(m: &Model) -> Model {
    let mut c = m.clone();
    c.force().unwrap();
    c.complete().unwrap();
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_sequences_keep_invariants_and_consistency(ops in prop::collection::vec(op(), 1..40)) {
        let addrs: BTreeSet<u64> = (0..5u64).map(|i| 0x1000 * (i + 1)).collect();
        let mut m = Model::new();
        let mut threads: BTreeSet<i32> = [1, 2, 3, 4].into();
        let mut serial = 0u64;
        let mut sides: Option<Sides> = None;
        for op in ops {
            match op {
                Op::Enable { funcs, replace } => {
                    serial += 1;
                    let fs: BTreeSet<u64> = funcs.iter().map(|i| 0x1000 * (*i as u64 + 1)).collect();
                    let pairs: Vec<(u64, u64)> = fs.iter().map(|a| (*a, a + serial)).collect();
                    let p = patch(&format!("p{serial}"), replace, &pairs);
                    let tids: Vec<i32> = threads.iter().copied().collect();
                    let without = idle_codes(&m, &addrs);
                    let busy = m.transition().is_some();
                    match m.begin_enable(p, &tids) {
                        Ok(()) => {
                            prop_assert!(!busy);
                            sides = Some((without, idle_codes(&finished(&m), &addrs)));
                        }
                        Err(e) => prop_assert!(busy, "{e}"),
                    }
                }
                Op::Disable(i) => {
                    let Some(name) = m.patches().get(i).map(|p| p.name.clone()) else { continue };
                    let tids: Vec<i32> = threads.iter().copied().collect();
                    let with = idle_codes(&m, &addrs);
                    match m.begin_disable(&name, &tids) {
                        Ok(DisableKind::Started) => {
                            sides = Some((idle_codes(&finished(&m), &addrs), with));
                        }
                        Ok(DisableKind::Reversed) => {}
                        Err(ModelError::Busy { .. }) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Switch(t) => { m.switch_thread(t); }
                Op::Complete => {
                    if m.transition().is_some() && m.pending().is_empty() {
                        m.complete().unwrap();
                        sides = None;
                    }
                }
                Op::Force => {
                    if m.transition().is_some() {
                        m.force().unwrap();
                        m.complete().unwrap();
                        sides = None;
                    }
                }
                Op::NewThread(t) => {
                    if threads.insert(t) { m.add_thread(t); }
                }
                Op::NewPendingThread(t) => {
                    if threads.insert(t) {
                        m.add_pending_thread(t);
                        if let Some(tr) = m.transition() {
                            prop_assert!(tr.pending.contains(&t));
                            prop_assert_eq!(m.thread_state(t), tr.target.flipped().thread_state());
                        }
                    }
                }
                Op::ExitThread(t) => {
                    if threads.remove(&t) { m.remove_thread(t); }
                }
            }
            m.check_invariants().map_err(TestCaseError::fail)?;
            // The redirection rule: an unpatched thread sees the world
            // without the transition patch, a patched one with it.
            if let (Some(t), Some((without, with))) = (m.transition(), &sides) {
                let _ = t;
                for a in &addrs {
                    prop_assert_eq!(m.code_for(*a, ThreadState::Unpatched), without[a]);
                    prop_assert_eq!(m.code_for(*a, ThreadState::Patched), with[a]);
                }
            } else {
                prop_assert!(m.transition().is_none());
                for a in &addrs {
                    // Outside a transition every site is one jump or the original.
                    let dispatch = matches!(m.site_mode(*a), SiteMode::Dispatch { .. });
                    prop_assert!(!dispatch);
                    prop_assert!(m.site_mode(*a) != SiteMode::Jump(Code::Original));
                }
            }
        }
    }
}
