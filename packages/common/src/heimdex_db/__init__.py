"""`heimdex db` as plain functions: what a deployment runs; tooling in lint/, supabase/, verify/."""
