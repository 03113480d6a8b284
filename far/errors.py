"""Errors a user can act on. Stages print them as one line and exit non-zero, never with a traceback.

Exit codes let orchestrators decide on retries: `INVALID_INPUT` (bad params, missing or corrupt inputs)
cannot succeed on retry; anything else might (a transient I/O or resource failure).
"""

INVALID_INPUT = 2
FAILED = 1


class FarError(RuntimeError):
    """A failure with a message that names what was wrong and where (file, key, stage)."""

    exit_code = FAILED


class InvalidInputError(FarError, ValueError):
    """Bad params or bad input data: retrying will not help."""

    exit_code = INVALID_INPUT


def run_app(app, prog: str) -> None:  # noqa: ANN001 - a typer.Typer; typer is imported lazily
    """Run a typer app; a FarError becomes `<prog>: error: <message>` and its exit code, no traceback."""
    import sys

    import click

    try:
        app(standalone_mode=False)
    except FarError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # bad flags: click's own message, exit code 2
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
