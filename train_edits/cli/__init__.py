"""The ``train_edits`` command: one group, its subcommands by role.

    edits.py       prepare-corpora; the run's steps select, train, calibrate, eval, pack and run; sweep; protocol;
                   table
    build.py       build NAME (a named artefact by its recipe), report DIR... (Tables 3 and 4 of runs)
    backpack.py    backpack train (a Backpack from scratch, any tokenizer; `torchrun -m train_edits backpack`)
    sense_head.py  sense-head train (a sense head distilled from a causal LM)
    common.py      the error → exit-code mapping every command shares

Exit codes: 0 success, 1 failure (bad data, missing files, runtime errors), 2 usage (bad options or config).
"""

from __future__ import annotations

import click

from .backpack import backpack
from .build import build, report
from .edits import STEPS, prepare_corpora, protocol_cmd, sweep_cmd, table_cmd
from .sense_head import sense_head


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Sense-finetune a Backpack on canonical examples and write calibrated, evaluated edit packs."""


for _command in (prepare_corpora, *STEPS, sweep_cmd, protocol_cmd, table_cmd, build, report, backpack, sense_head):
    main.add_command(_command)
