"""`python -m heimdex`: the `heimdex` command, for child processes of this interpreter."""

from heimdex.cli import main

if __name__ == "__main__":
    main(prog_name="heimdex")
