"""The Supabase artifacts: each revision's offline SQL, compiled and checked."""
