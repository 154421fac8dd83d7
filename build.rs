// Re-embed the SQL migrations (sqlx::migrate!) whenever one changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
