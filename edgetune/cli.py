"""The ``edgetune`` command line: a click group; each command imports its heavy modules lazily.

Every ``EdgetuneError`` (a user mistake or a resource problem) becomes one line on stderr and
exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import sys

import click

from edgetune import __version__
from edgetune.commands import collect_cmds, delta_cmds, device_cmds, export_cmds, runtime_cmds, sync_cmd
from edgetune.errors import EdgetuneError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetune")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fine-tune pretrained models on the device that holds the data.

    \b
    Workstation:  edgetune export [MODEL] --out bundle
    Device:       edgetune train bundle --data notes.jsonl
                  edgetune eval bundle --data held.jsonl
                  edgetune generate bundle --prompt "..."
                  edgetune delta bundle --out update.etd
                  edgetune sync bundle --server URL --token T --data notes.jsonl
    """
    ctx.obj = {"debug": debug}


for module in (export_cmds, runtime_cmds, delta_cmds, sync_cmd, collect_cmds, device_cmds):
    for command in module.COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="edgetune", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except EdgetuneError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if debug:
            raise
        if exc.errno == errno.ENOSPC:
            click.echo(f"error: the disk is full ({exc.filename or 'while writing'}); free space and run again. "
                       "Nothing already saved was replaced.", err=True)
            sys.exit(2)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            click.echo(f"error: no permission to write {exc.filename!r}; choose another location.", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
