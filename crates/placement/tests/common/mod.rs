pub mod check;
pub mod pools;
pub mod sim;

/// Proptest case count: `PROPTEST_CASES` when set (for long local runs),
/// else `default` (sized so the suite stays fast in debug builds).
#[allow(dead_code)]
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
