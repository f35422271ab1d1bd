//! Bench output: a table on stdout and the same rows as JSON under `target/bench/`.

/// Prints `rows` (scenario, figure) as a table and writes them to `target/bench/<name>.json`.
///
/// # Panics
/// When the JSON file cannot be written.
pub fn report(name: &str, rows: &[(String, String)]) {
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("\n{:width$}  figure", "scenario");
    println!("{}  {}", "-".repeat(width), "-".repeat(40));
    for (scenario, figure) in rows {
        println!("{scenario:width$}  {figure}");
    }
    let json: serde_json::Map<String, serde_json::Value> = rows
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("failed to create target/bench");
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&json).expect("rows serialize"),
    )
    .expect("failed to write the bench json");
}
