"""Named recipes: the artefacts a registry name (ensemble.zoo) is built from, reproducibly.

    train_edits build backpack-smollm2 --out DIR     a Backpack on SmolLM2's tokenizer (train_backpack)
    train_edits build sense-smollm2 --out DIR        a sense head on SmolLM2's hidden states (train_sense_head);
                                                     the zoo installs the committed weights this reproduces
    train_edits build capitals-smollm2 --out DIR     a pack store holding `capitals` (alias prod):
                                                     country_capital canonical statements, sense-finetuned on
                                                     sense-smollm2, β calibrated against SmolLM2

Every recipe reads only data the package ships (train_edits/data, see its README), so a clone
with no ../shared builds the same artefacts. Each output folder records the recipe (its
training.json / sensepack-source.json), and the numbers are fixed (steps, not minutes), so two
builds on one machine give the same weights.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .backpack_trainer.config import BackpackTrainConfig
    from .sense_head_trainer import SenseHeadTrainConfig

DATA_DIR = Path(__file__).resolve().parent / "data"
OWT_CORPUS = DATA_DIR / "owt-val100.jsonl.gz"
COUNTRY_FIXED = DATA_DIR / "country_capital" / "country_capital_fixed-val.jsonl"

log = logging.getLogger("train_edits.recipes")


def backpack_smollm2_config(out: str | Path) -> BackpackTrainConfig:
    """The backpack-smollm2 recipe: ~19M parameters (d 256, 4 layers, 16 senses), E started from a PCA
    of SmolLM2's tied embedding, LM loss on the shipped OpenWebText sample; about 6 minutes on 2 CPU cores."""
    from .backpack_trainer.config import BackpackTrainConfig

    return BackpackTrainConfig(
        out=str(out),
        inputs=[str(OWT_CORPUS)],
        tokenizer="smollm2-135m-instruct",
        heldout_fraction=0.05,
        n_embd=256,
        n_layer=4,
        n_head=4,
        num_senses=16,
        n_positions=512,
        sense_intermediate_scale=2,
        block_len=256,
        batch_size=4,
        lr=2e-3,
        warmup_steps=30,
        weight_decay=0.0,
        max_steps=BACKPACK_STEPS,
        init_embeddings="large-pca",
        init_from="smollm2-135m-instruct",
        eval_every=100,
        checkpoint_every=100,
        keep_checkpoints=0,
        seed=0,
    )


BACKPACK_STEPS = 300


def sense_smollm2_config(out: str | Path) -> SenseHeadTrainConfig:
    """The sense-smollm2 recipe: a sense head on SmolLM2's final hidden states (16 senses, ~9M parameters),
    distilled from SmolLM2 on the R documents of the shipped OpenWebText sample (the G documents stay held out).
    The teacher pass (~210k tokens) is cached on disk and resumes; the weights are stored as float16."""
    from .sense_head_trainer import SenseHeadTrainConfig

    return SenseHeadTrainConfig(
        out=str(out),
        large="smollm2-135m-instruct",
        inputs=[str(OWT_CORPUS)],
        block_len=256,
        num_senses=16,
        sense_intermediate_scale=1,
        max_distance=256,
        n_positions=1024,
        topk=32,
        distill_weight=0.9,
        batch_size=8,
        lr=1e-3,
        warmup_steps=20,
        max_steps=SENSE_HEAD_STEPS,
        eval_every=50,
        checkpoint_every=25,
        save_dtype="float16",
        keep_checkpoints=False,
        seed=0,
    )


SENSE_HEAD_STEPS = 600


@dataclass
class PackRecipe:
    """A pack trained by the train_edits pipeline and published into a store under `alias`."""

    name: str
    task: dict
    backpack: str
    large: str
    tokenizer: str
    select: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    calibrate: dict = field(default_factory=dict)
    chunk_len: int = 128
    g_limit: int = 64
    r_limit: int = 256
    alias: str = "prod"
    epsilon: float = 1e-3


def capitals_smollm2_recipe() -> PackRecipe:
    return PackRecipe(
        name="capitals",
        task={"name": "capitals", "train": str(COUNTRY_FIXED), "loss_type": "good", "threshold": 1.6094379124341003},
        backpack="sense-smollm2",
        large="smollm2-135m-instruct",
        tokenizer="smollm2-135m-instruct",
        select={"k": 8, "lam": 1000.0},
        # the pairing's defaults chosen on val (train_edits.pairings), fewer epochs to keep `make demo` short
        train={
            "lr": 0.03,
            "kl_weight": 0.3,
            "rest_kl_weight": 1.0,
            "rest_scope": "after",
            "epochs": 4,
            "epsilons": [1e-3],
            "eval_every_epoch": False,
        },
        calibrate={"grid": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0]},
    )


RECIPES = {"backpack-smollm2": "backpack", "sense-smollm2": "sense head", "capitals-smollm2": "pack"}


def build(name: str, out: str | Path, progress: bool = True) -> Path:
    """Build the named artefact into `out` (a folder that must not exist or be empty)."""
    out = Path(out)
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r} (known: {', '.join(sorted(RECIPES))})")
    t0 = time.time()
    if name == "backpack-smollm2":
        from .backpack_trainer.trainer import train_backpack

        train_backpack(backpack_smollm2_config(out), progress=progress)
    elif name == "sense-smollm2":
        from .sense_head_trainer import train_sense_head

        train_sense_head(sense_smollm2_config(out), progress=progress)
    else:
        build_pack_store(capitals_smollm2_recipe(), out, progress=progress)
    (out / "sensepack-source.json").write_text(
        json.dumps(
            {
                "name": name,
                "recipe": f"train_edits.recipes:{name}",
                "seconds": round(time.time() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=1,
        )
    )
    return out


def build_pack_store(recipe: PackRecipe, out: Path, progress: bool = True) -> Path:
    """prepare-corpora -> select -> train -> calibrate -> pack, published into a local store at `out`."""
    from edits_store.store import open_store
    from ensemble.tokenizer import load_tokenizer

    from .config import validate
    from .corpora import prepare_corpora, read_documents
    from .pipeline import step_calibrate, step_pack, step_select, step_train
    from .run import Run, log_to_run

    work = out / "run"
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(recipe.tokenizer)
    docs = read_documents([OWT_CORPUS])
    corpora = work / "corpora"
    prepare_corpora(tok, docs, corpora, recipe.chunk_len, inputs=[str(OWT_CORPUS)], tokenizer_spec=recipe.tokenizer)
    cfg = validate(
        {
            "name": recipe.name,
            "task": recipe.task,
            "models": {"backpack": recipe.backpack, "large": recipe.large, "tokenizer": recipe.tokenizer},
            "corpora": {
                "g": str(corpora / "G.jsonl"),
                "r": str(corpora / "R.jsonl"),
                "g_limit": recipe.g_limit,
                "r_limit": recipe.r_limit,
            },
            "select": recipe.select,
            "train": recipe.train,
            "calibrate": recipe.calibrate,
            "store": str(out / "store"),
        }
    )
    log_to_run(work)
    run = Run(work, cfg, progress)
    step_select(run)
    step_train(run)
    step_calibrate(run)
    step_pack(run, names={recipe.epsilon: recipe.name})
    store = open_store(str(out / "store"))
    _, version = store.resolve(recipe.name)
    store.set_alias(recipe.name, recipe.alias, version)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    return out
