pub async fn run(_s: &str, _store: Option<&str>, _n: Option<u32>) -> anyhow::Result<()> { Ok(()) }
