"""`heimdex db verify`: the whole history up, down and up again in a throwaway database."""
