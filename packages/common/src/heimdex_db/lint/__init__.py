"""`heimdex db lint`: SQL that locks or breaks a live database, found before it ships."""
