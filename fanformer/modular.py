"""Leave-square-out: does a model learn the rule, or the cases around a hole?

The FANformer paper (Dong et al. 2025, arXiv 2502.21309, section "rule-based
reasoning") trains on c = (a + b) mod 113 with a, b in [0, 112] and on
c = a + 2b + 3 with a, b in [0, 99], holds a 21 x 21 square of (a, b) pairs out of
training ("leave-square-out", after Hu et al. 2024, "Case-Based or Rule-Based: How Do
Transformers Do the Math?", arXiv 2402.17709) and reports, as heat maps only, that a
Transformer shows a "black hole" of near-zero accuracy in the square while FANformer
does not. This module reproduces that test at a size two CPU cores train in minutes.

Choices, each one a place where the paper gives no number:

- **Sequences** are three tokens `a b =`; the model predicts `c` at `=`, and the loss
  and the accuracy are taken on that one token only. Every number is one token of a
  word-level vocabulary whose ids 0..N are the numbers "0".."N" in order (N = the
  largest answer: 112, or 300 for the linear task), followed by `=`, the project's
  `<|bos|>`/`<|eos|>`/`<|pad|>` and `<|unk|>`. The ordered number ids are what the
  Fourier Head's bins and `fanformer analyze fourier` rely on.
- **The held-out square** is centred on the grid: a, b in [46, 67) for add_mod and
  [39, 60) for linear (`Task.square`). Training data is every other pair (12,328 and
  9,559 pairs); nothing is held out besides the square, so "train accuracy" is
  accuracy on the whole training set and the square is the only test.
- **Equal parameter counts.** FANformer (p = 0.25) has a FAN projection per block that
  the p = 0 Transformer lacks; the Transformer gets the FFN width that brings its
  count closest to FANformer's (`matched_transformer`), within a fraction of a
  percent for the default shape.
- **Model** (defaults): d = 128, 2 pre-norm blocks, 4 heads, untied embeddings;
  FANformer p = 0.25 with FFN 512, the Transformer p = 0 with FFN 544 (579,904 against
  579,712 parameters on add_mod, 0.03% apart).
- **Training** is grokking-style (Power et al. 2022; Nanda et al. 2023): AdamW, lr 1e-3,
  betas (0.9, 0.98), weight decay 1.0 on the matrices (not on norms and biases, as in
  `fanformer.training.param_groups`), 50 warmup steps then a constant learning rate,
  600 steps of 512 pairs drawn with replacement from a generator seeded by the run's
  seed. Both models of a seed see the same batches in the same order, and the same
  seed initialises both (their weights differ, as their shapes do).
- **Accuracy** is greedy: the argmax over the whole vocabulary at `=` must be c. It is
  taken over the whole grid every `eval_every` steps (`curves.png`), because the square
  can fill in long after the training pairs are fitted (grokking): a single number at
  one step is a snapshot of that race, and the curves show which side of it a run is on.
- **Runs** (task x model x seed) are independent and each runs on one thread, `jobs` of
  them at a time in spawned worker processes. One thread per run because these models
  are small: a second OpenMP thread gains little, and on a busy machine its spin-waits
  make a step many times slower; and a run's numbers then do not depend on `jobs`.

Each trained model is a normal project checkpoint (`fanformer generate
runs/modular/add_mod/fanformer-seed0 --prompt "12 34 =" --max-new-tokens 1 --greedy`,
`fanformer analyze fourier ...`); `results.json`, `heatmaps.png` (accuracy over (a, b),
mean over seeds, one panel per model and task, the square outlined) and `curves.png`
sit beside them.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm.auto import tqdm

from fanformer.checkpoint import check_output_dir, save_checkpoint
from fanformer.processes import in_worker, terminate_pool, worker_signals
from fanformer.outputs import write_file_atomically
from fanformer.config import HEADS, FANformerConfig, knob
from fanformer.errors import FANformerError
from fanformer.model import FANformer, count_parameters
from fanformer.tokenizer import BOS, EOS, PAD
from fanformer.training import param_groups

SQUARE = 21  # side of the held-out square, as in the paper
EQUALS = "="
UNK = "<|unk|>"
RESULTS_FILE = "results.json"
HEATMAPS_FILE = "heatmaps.png"
CURVES_FILE = "curves.png"  # square and train accuracy against step
RUN_FILE = "modular_run.json"  # in each checkpoint: task, seed, square, accuracies


# --- Tasks ----------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    formula: str
    size: int  # a and b range over [0, size)
    answer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def max_number(self) -> int:
        """The largest number token: the largest operand or answer."""
        return max(self.size - 1, int(self.answer(*grid(self)).max()))

    @property
    def square(self) -> tuple[int, int]:
        """(a0, b0): the held-out square is a in [a0, a0 + 21), b in [b0, b0 + 21), centred."""
        start = (self.size - SQUARE) // 2
        return start, start


TASKS = {
    "add_mod": Task("add_mod", "c = (a + b) mod 113", 113, lambda a, b: (a + b) % 113),
    "linear": Task("linear", "c = a + 2b + 3", 100, lambda a, b: a + 2 * b + 3),
}


def grid(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (a, b) pair, a-major: a and b as flat tensors of length size**2."""
    a, b = torch.meshgrid(torch.arange(task.size), torch.arange(task.size), indexing="ij")
    return a.flatten(), b.flatten()


def in_square(task: Task, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a0, b0 = task.square
    return (a >= a0) & (a < a0 + SQUARE) & (b >= b0) & (b < b0 + SQUARE)


def training_pairs(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair outside the held-out square."""
    a, b = grid(task)
    keep = ~in_square(task, a, b)
    return a[keep], b[keep]


# --- Tokenizer and examples -------------------------------------------------------

def task_tokenizer(task: Task) -> Tokenizer:
    """Word-level: ids 0..N are "0".."N", then `=`, BOS, EOS, PAD, UNK."""
    words = [str(n) for n in range(task.max_number + 1)] + [EQUALS, BOS, EOS, PAD, UNK]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def examples(tokenizer: Tokenizer, task: Task, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs `a b =` (B, 3) and the answer token ids (B,). Number n is token id n."""
    equals = tokenizer.token_to_id(EQUALS)
    inputs = torch.stack([a, b, torch.full_like(a, equals)], dim=1)
    return inputs, task.answer(a, b)


# --- Models -----------------------------------------------------------------------

@dataclass
class ExperimentConfig:
    """What `fanformer experiment modular` trains; the flags are these fields."""
    tasks: tuple[str, ...] = ("add_mod", "linear")
    seeds: int = knob(3, "seeds 0..N-1; each trains both models")
    steps: int = knob(600, "optimizer steps per model")
    batch_size: int = knob(512, "pairs per step, drawn with replacement (>= the training set: full batch)")
    lr: float = knob(1e-3, "AdamW learning rate after warmup (constant)")
    weight_decay: float = knob(1.0, "AdamW weight decay on matrices")
    warmup_steps: int = 50
    eval_every: int = knob(100, "accuracy over the whole grid every N steps (results.json history, curves.png)")
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = knob(512, "FANformer's FFN width; the Transformer's is matched to its parameter count")
    p: float = knob(0.25, "FANformer's periodicity ratio (the Transformer has p = 0)")
    jobs: int = knob(0, "runs trained at once, one thread each; 0 = one per CPU core")
    head: str = knob("linear", "LM head of both models: linear, or fourier (Fourier Head over the ordered "
                     "number tokens)")
    fourier_frequencies: int = knob(16, "frequencies of the Fourier head's density (with --head fourier)")
    extra: dict = field(default_factory=dict)  # further FANformerConfig fields for both models (Python API)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise FANformerError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
        if self.jobs < 0:
            raise FANformerError(f"jobs must be >= 0 (0 = one per CPU core), got {self.jobs}")
        for name in ("seeds", "steps", "batch_size", "eval_every", "d_model", "n_layers", "n_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise FANformerError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise FANformerError("lr must be > 0, weight_decay and warmup_steps >= 0")
        if not 0 < self.p < 0.5:
            raise FANformerError(f"p must be in (0, 0.5) for the FANformer side (the Transformer has p = 0), "
                                 f"got {self.p}")
        if self.head not in HEADS:
            raise FANformerError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise FANformerError(f"d_model ({self.d_model}) must split into {self.n_heads} heads of even size")


def fanformer_config(config: ExperimentConfig, vocab_size: int) -> FANformerConfig:
    """The FANformer of the experiment: a small pre-norm model, MHA, untied, `head` as given."""
    return FANformerConfig(vocab_size=vocab_size, d_model=config.d_model, n_layers=config.n_layers,
                           n_heads=config.n_heads, n_kv_heads=config.n_heads,
                           head_dim=config.d_model // config.n_heads, ffn_dim=config.ffn_dim, max_seq_len=8,
                           p=config.p, norm="pre", head=config.head,
                           fourier_frequencies=config.fourier_frequencies, **config.extra)


def parameter_count(config: FANformerConfig) -> int:
    with torch.device("meta"):
        return count_parameters(FANformer(config))


def matched_transformer(config: FANformerConfig) -> FANformerConfig:
    """The p = 0 Transformer of the same shape whose FFN width brings its parameter
    count closest to `config`'s: the FAN projection's parameters go to the FFN."""
    target = parameter_count(config)
    plain = config.replace(p=0.0)
    per_unit = parameter_count(plain.replace(ffn_dim=plain.ffn_dim + 1)) - parameter_count(plain)
    ffn = plain.ffn_dim + round((target - parameter_count(plain)) / per_unit)
    best = min((max(1, ffn + delta) for delta in (-1, 0, 1)),
               key=lambda width: abs(parameter_count(plain.replace(ffn_dim=width)) - target))
    return plain.replace(ffn_dim=best)


def model_configs(config: ExperimentConfig, vocab_size: int) -> dict[str, FANformerConfig]:
    fan = fanformer_config(config, vocab_size)
    return {"fanformer": fan, "transformer": matched_transformer(fan)}


# --- Training and evaluation ---------------------------------------------------------

def train_model(model_config: FANformerConfig, inputs: torch.Tensor, targets: torch.Tensor,
                config: ExperimentConfig, seed: int, evaluate=None) -> tuple[FANformer, list[dict]]:
    """Train a fresh model on (inputs, targets); `evaluate(model)` -> dict is called every
    `eval_every` steps and at the end. Returns the model and those records."""
    torch.manual_seed(seed)
    model = FANformer(model_config).train()
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98))
    batches = torch.Generator().manual_seed(seed)
    full_batch = config.batch_size >= len(inputs)
    history = []
    for step in range(1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, step / max(1, config.warmup_steps))
        rows = slice(None) if full_batch else torch.randint(len(inputs), (config.batch_size,), generator=batches)
        logits, aux = model(inputs[rows], return_aux=True)  # aux: the Fourier head's penalty, else 0
        loss = F.cross_entropy(logits[:, -1].float(), targets[rows])  # only the answer, predicted at `=`
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        optimizer.step()
        if evaluate is not None and (step % config.eval_every == 0 or step == config.steps):
            history.append({"step": step, "loss": round(loss.item(), 5), **evaluate(model)})
            model.train()
    return model.eval(), history


@torch.no_grad()
def accuracy_grid(model: FANformer, tokenizer: Tokenizer, task: Task, batch_size: int = 4096) -> np.ndarray:
    """(size, size) array, [a, b] = 1.0 where the greedy answer to `a b =` is right."""
    model.eval()
    a, b = grid(task)
    inputs, targets = examples(tokenizer, task, a, b)
    right = torch.cat([model(inputs[i:i + batch_size])[:, -1].argmax(-1) == targets[i:i + batch_size]
                       for i in range(0, len(inputs), batch_size)])
    return right.float().reshape(task.size, task.size).numpy()


def split_accuracy(task: Task, acc: np.ndarray) -> dict[str, float]:
    """Mean accuracy outside (train) and inside (held out) the square."""
    a, b = grid(task)
    mask = in_square(task, a, b).reshape(task.size, task.size).numpy()
    return {"train_acc": float(acc[~mask].mean()), "square_acc": float(acc[mask].mean())}


# --- The experiment --------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    task: str
    model: str  # "fanformer" or "transformer"
    seed: int


def train_and_save(run: Run, model_config: FANformerConfig, config: ExperimentConfig, out: Path) -> tuple[dict, np.ndarray]:
    """One model of one seed on one task, on one thread: train, evaluate over the grid, save
    the checkpoint out/TASK/MODEL-seedK. Returns its results entry and its accuracy grid.

    One thread, whatever the caller's setting, so a run gives the same numbers in the
    main process and in a worker; the experiment uses the cores by running several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        task, tokenizer = TASKS[run.task], task_tokenizer(TASKS[run.task])
        inputs, targets = examples(tokenizer, task, *training_pairs(task))

        def evaluate(model):
            return {k: round(v, 4) for k, v in split_accuracy(task, accuracy_grid(model, tokenizer, task)).items()}

        model, history = train_model(model_config, inputs, targets, config, run.seed, evaluate)
        acc = accuracy_grid(model, tokenizer, task)
        entry = {"seed": run.seed, **split_accuracy(task, acc), "seconds": round(time.perf_counter() - started, 1)}
        checkpoint = out / run.task / f"{run.model}-seed{run.seed}"
        summary = {"task": run.task, "formula": task.formula, "model": run.model, "square": square_bounds(task),
                   **entry}
        save_checkpoint(checkpoint, model, tokenizer, extra_files={RUN_FILE: json.dumps(summary, indent=2)})
        return {**entry, "checkpoint": str(checkpoint), "history": history}, acc
    finally:
        torch.set_num_threads(threads)


def square_bounds(task: Task) -> dict[str, list[int]]:
    a0, b0 = task.square
    return {"a": [a0, a0 + SQUARE - 1], "b": [b0, b0 + SQUARE - 1]}


def run_experiment(config: ExperimentConfig, out: str | Path, force: bool = False,
                   progress: bool = True) -> dict:
    """Train FANformer and the matched Transformer on every task and seed, `config.jobs`
    runs at a time, save each as a checkpoint under out/TASK/MODEL-seedK, and write
    results.json, heatmaps.png and curves.png into `out`. Returns the results."""
    out = check_output_dir(out, force)
    started = time.perf_counter()
    configs = {name: model_configs(config, task_tokenizer(TASKS[name]).get_vocab_size()) for name in config.tasks}
    runs = [Run(task, model, seed) for task in config.tasks for seed in range(config.seeds) for model in configs[task]]
    finished: dict[Run, tuple[dict, np.ndarray]] = {}
    bar = tqdm(total=len(runs), desc="runs", unit="run", disable=not progress, dynamic_ncols=True)

    def done(run: Run, result: tuple[dict, np.ndarray]) -> None:
        finished[run] = result
        bar.update(1)
        if progress:
            bar.write(f"{run.task} {run.model} seed {run.seed}: train acc {result[0]['train_acc']:.4f}, "
                      f"square acc {result[0]['square_acc']:.4f} ({result[0]['seconds']:.0f} s)")

    jobs = min(config.jobs or os.cpu_count() or 1, len(runs))
    if jobs == 1:
        for run in runs:
            done(run, train_and_save(run, configs[run.task][run.model], config, out))
    else:
        # spawn, not fork: a forked child of a process that has started OpenMP threads can hang.
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=worker_signals)
        try:
            futures = {pool.submit(in_worker, train_and_save, run, configs[run.task][run.model], config, out): run
                       for run in runs}
            for future in as_completed(futures):
                done(futures[future], future.result())
        except BaseException:  # Ctrl-C, SIGTERM or a failed run: end the running runs too, not only the queue
            terminate_pool(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()

    results: dict = {"config": dataclasses.asdict(config), "square_size": SQUARE, "tasks": {}}
    mean_grids: dict[str, dict[str, np.ndarray]] = {}
    for task_name in config.tasks:
        task = TASKS[task_name]
        n_train = task.size ** 2 - SQUARE ** 2
        models = {}
        for name, model_config in configs[task_name].items():
            entries = [finished[Run(task_name, name, seed)] for seed in range(config.seeds)]
            models[name] = {"parameters": parameter_count(model_config), "p": model_config.p,
                            "ffn_dim": model_config.ffn_dim, **summarize([entry for entry, _ in entries]),
                            "runs": [entry for entry, _ in entries]}
            mean_grids.setdefault(task_name, {})[name] = np.mean([acc for _, acc in entries], axis=0)
        results["tasks"][task_name] = {"formula": task.formula, "operand_range": [0, task.size - 1],
                                       "square": square_bounds(task), "train_examples": n_train,
                                       "square_examples": SQUARE ** 2, "models": models}
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_file_atomically(out / HEATMAPS_FILE, lambda path: plot_heatmaps(mean_grids, path))
    write_file_atomically(out / CURVES_FILE, lambda path: plot_curves(results, path))
    write_file_atomically(out / RESULTS_FILE, lambda path: path.write_text(json.dumps(results, indent=2)))
    return results


def summarize(entries: list[dict]) -> dict:
    """Mean, std, min and max over seeds of train and square accuracy."""
    stats = {}
    for key in ("train_acc", "square_acc"):
        values = np.array([entry[key] for entry in entries])
        stats[key] = {"mean": float(values.mean()), "std": float(values.std()),
                      "min": float(values.min()), "max": float(values.max())}
    return stats


def plot_heatmaps(mean_grids: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """One panel per task (row) and model (column): accuracy over (a, b), square outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    tasks = list(mean_grids)
    names = list(next(iter(mean_grids.values())))
    fig, axes = plt.subplots(len(tasks), len(names), figsize=(4 * len(names) + 1, 3.8 * len(tasks)), squeeze=False,
                             layout="constrained")
    for row, task_name in enumerate(tasks):
        task = TASKS[task_name]
        a0, b0 = task.square
        for col, name in enumerate(names):
            ax = axes[row][col]
            image = ax.imshow(mean_grids[task_name][name], origin="lower", cmap="viridis", vmin=0, vmax=1,
                              interpolation="nearest")
            # imshow's rows are a, columns b: the square spans x = b, y = a.
            ax.add_patch(Rectangle((b0 - 0.5, a0 - 0.5), SQUARE, SQUARE, fill=False, edgecolor="red", linewidth=1.2))
            ax.set_title(f"{name}: {task.formula}", fontsize=9)
            ax.set_xlabel("b")
            ax.set_ylabel("a")
    fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy (mean over seeds)")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_curves(results: dict, path: Path) -> None:
    """Accuracy against step, one panel per task: solid = held-out square, dashed = train,
    each the mean over seeds (the square can fill in long after training is fitted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, (task_name, task) in zip(axes[0], tasks.items()):
        for color, (name, entry) in zip(("tab:red", "tab:blue"), task["models"].items()):
            steps = [record["step"] for record in entry["runs"][0]["history"]]
            for key, style in (("square_acc", "-"), ("train_acc", "--")):
                values = np.mean([[record[key] for record in run["history"]] for run in entry["runs"]], axis=0)
                ax.plot(steps, values, style, color=color, label=f"{name} {key.split('_')[0]}")
        ax.set_title(task["formula"], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (mean over seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def format_results(results: dict) -> str:
    """The table the CLI prints: mean ± std over seeds, and each seed's numbers."""
    lines = [f"{'task':<8} {'model':<12} {'params':>8} {'train acc':>16} {'square acc':>16}  per seed (train / square)"]
    for task_name, task in results["tasks"].items():
        for name, entry in task["models"].items():
            per_seed = ", ".join(f"{r['train_acc']:.3f}/{r['square_acc']:.3f}" for r in entry["runs"])
            lines.append(f"{task_name:<8} {name:<12} {entry['parameters']:>8,} "
                         f"{_pm(entry['train_acc']):>16} {_pm(entry['square_acc']):>16}  {per_seed}")
    config = results["config"]
    lines.append(f"{config['seeds']} seed(s), {config['steps']} steps of batch {config['batch_size']}, "
                 f"{SQUARE}x{SQUARE} square held out, {results['seconds']:.0f} s")
    return "\n".join(lines)


def _pm(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"
