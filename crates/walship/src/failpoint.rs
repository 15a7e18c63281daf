//! Test-only fault injection: the integration suite makes a command fail at a named step, the way a
//! bug or a kill would, to prove that what is left behind is safe. Inert unless the environment
//! variable [`FAILPOINT_VAR`] names the step, which no operator sets.

/// `WALSHIP_TEST_FAILPOINT=<step>` panics at that step; `<step>:abort` aborts the process there (as
/// a crash or SIGKILL would: no destructor, no cleanup, no exit code of ours).
pub const FAILPOINT_VAR: &str = "WALSHIP_TEST_FAILPOINT";

/// Fails here if the test suite asked for it.
pub fn hit(step: &str) {
    let Some(wanted) = std::env::var_os(FAILPOINT_VAR) else { return };
    let wanted = wanted.to_string_lossy();
    match wanted.strip_suffix(":abort") {
        Some(name) if name == step => std::process::abort(),
        _ if wanted == step => panic!("test failpoint {step}"),
        _ => {}
    }
}
