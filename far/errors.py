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
    """Run a typer app; a FarError becomes `<prog>: error: <message>` and its exit code, no traceback.

    Exit codes (README, "Parameters"): 2 bad input (FarError INVALID_INPUT, bad flags), 1 any other failure,
    130 interrupted. Typer >= 0.2x vendors click (`typer._click`): its exceptions are not click's, so both
    families are caught here.
    """
    import sys

    import click
    import typer

    from far.progress import silence_library_bars

    silence_library_bars()  # before any library imports tqdm (stages, `far`, `python -m pipelines.flows`)
    usage_errors = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
    try:
        app(standalone_mode=False)
    except FarError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except usage_errors as exc:  # bad flags: click's own message (with the usage line), exit code 2
        if hasattr(exc, "show"):
            exc.show()
        else:
            print(f"{prog}: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (click.Abort, typer.Abort, KeyboardInterrupt):
        sys.exit(130)
