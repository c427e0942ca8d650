"""The model-agnostic engine: one denoising step on a chosen subset of image tokens.

An adapter calls `begin_step` after its patch embedding (which returns the
image tokens to run, or None for all) and `end_step` with the per-token
outputs of those tokens (which returns the full grid). Between the two, the
adapter's attention processors read the shared AttentionContext. State is
kept per generation and per branch (a branch is a second call of the
transformer at the same timestep, e.g. FLUX's true CFG), never globally.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from specdiff.engine.attention import AttentionContext, LayerKV
from specdiff.engine.history import HISTORY_LENGTH, TokenHistory
from specdiff.engine.policy import BlockCall, Policy, StepPlan, StepSignals


@dataclasses.dataclass
class StepRecord:
    phase: str  # "speculative" or "real"
    branch: int
    step: int
    timestep: float
    kind: str  # "dense" or "sparse"
    computed: int  # C1 tokens per row
    reused: float  # C2 tokens, mean over rows
    approximated: float  # C3 tokens, mean over rows
    tokens: int
    scoring_seconds: float  # host time of taps, selection and bookkeeping
    blocks_computed: float | None = None  # block-level policies: share of blocks run this step
    tapped: bool = False  # attention taps measured in this step


@dataclasses.dataclass
class GenerationSummary:
    method: str
    config: object
    records: list[StepRecord] = dataclasses.field(default_factory=list)
    speculation_seconds: float = 0.0
    total_seconds: float = 0.0
    # C2 counts still on the device, read in one go by resolve(): no host sync per step
    pending_reused: list[tuple[StepRecord, torch.Tensor]] = dataclasses.field(default_factory=list, repr=False)

    def resolve(self) -> GenerationSummary:
        """Fill the C2 / C3 counts of sparse steps from the device (one transfer)."""
        if self.pending_reused:
            counts = torch.stack([c for _, c in self.pending_reused]).tolist()
            for (record, _), reused in zip(self.pending_reused, counts):
                record.reused = reused
                record.approximated = float(record.tokens - record.computed) - reused
            self.pending_reused = []
        return self

    @property
    def scoring_seconds(self) -> float:
        """Taps, selection and bookkeeping of the real run (the speculative pass counts as speculation)."""
        return sum(r.scoring_seconds for r in self.records if r.phase == "real")

    def real_steps(self) -> list[StepRecord]:
        return [r for r in self.records if r.phase == "real"]

    def computed_fraction(self) -> float:
        """Image-token forwards run, over those of full compute (speculation included)."""
        real = self.real_steps()
        if not real:
            return 0.0
        done = sum(r.computed * (1.0 if r.blocks_computed is None else r.blocks_computed) for r in self.records)
        return done / sum(r.tokens for r in real)

    LEGEND = (
        "phase: speculative (the short look-ahead run) or real; branch: 0, or 1 for a second call per step "
        "(FLUX true CFG); kind: dense (every token) or sparse; C1: image tokens computed per row; C2: tokens "
        "that copied their last output; C3: tokens extrapolated from their last three outputs; blocks run: "
        "share of transformer blocks run (block-level methods); taps: attention measured for the next plan"
    )

    def to_dict(self) -> dict:
        """Plain numbers, for JSON or a DataFrame: one dict per step under "steps"."""
        self.resolve()
        return {
            "method": self.method, "config": repr(self.config), "total_seconds": self.total_seconds,
            "speculation_seconds": self.speculation_seconds, "scoring_seconds": self.scoring_seconds,
            "computed_fraction": self.computed_fraction(),
            "steps": [dataclasses.asdict(r) for r in self.records],
        }

    def _rows(self) -> list[tuple]:
        self.resolve()
        return [
            (r.phase, r.branch, r.step, f"{r.timestep:.1f}", r.kind, r.computed, f"{r.reused:.0f}",
             f"{r.approximated:.0f}", "all" if r.blocks_computed is None else f"{100 * r.blocks_computed:.0f}%",
             "yes" if r.tapped else "-")
            for r in self.records
        ]

    _HEAD = ("phase", "branch", "step", "timestep", "kind", "C1", "C2", "C3", "blocks run", "taps")

    def _footer(self) -> str:
        total = max(self.total_seconds, 1e-9)
        return (
            f"total {self.total_seconds:.3f} s; speculation {self.speculation_seconds:.3f} s "
            f"({100 * self.speculation_seconds / total:.1f}%); scoring and bookkeeping "
            f"{self.scoring_seconds:.3f} s ({100 * self.scoring_seconds / total:.1f}%); "
            f"token-block work {100 * self.computed_fraction():.1f}% of full compute"
        )

    def __str__(self) -> str:
        widths = (12, 6, 5, 10, 8, 7, 8, 8, 12, 6)
        line = lambda cells: "".join(  # noqa: E731
            f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [f"method: {self.method}   config: {self.config}", line(self._HEAD)]
        lines += [line(row) for row in self._rows()]
        lines += [self._footer(), self.LEGEND]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"GenerationSummary(method={self.method!r}, steps={len(self.real_steps())}, "
                f"total_seconds={self.total_seconds:.3f}, computed_fraction={self.computed_fraction():.3f})")

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython
        printer.text(repr(self) if cycle else str(self))

    def _repr_html_(self) -> str:  # notebooks
        import html

        head = "".join(f"<th>{h}</th>" for h in self._HEAD)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                       for row in self._rows())
        return (f"<p><b>{html.escape(self.method)}</b> {html.escape(str(self.config))}</p>"
                f"<table><tr>{head}</tr>{body}</table><p>{html.escape(self._footer())}</p>"
                f"<p><small>{html.escape(self.LEGEND)}</small></p>")


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """What an observer sees of one planned real step: the signals the policy read and its plan."""

    branch: int  # 0, or 1 for a second call at the same timestep (FLUX true CFG)
    step: int
    timestep: float
    signals: StepSignals
    plan: StepPlan


@dataclasses.dataclass
class BranchState:
    history: TokenHistory = dataclasses.field(default_factory=TokenHistory)
    attention: torch.Tensor | None = None  # taps of the last step
    future: list[tuple[float, torch.Tensor]] = dataclasses.field(default_factory=list)
    # per speculative timestep, how fast each token's output moved since the previous speculative step
    future_change: list[tuple[float, torch.Tensor]] = dataclasses.field(default_factory=list)
    step: int = 0
    block_state: object = None  # a block-level policy's own state (Policy.new_block_state)
    block_work: float = 0.0  # block work done in the current step, summed over its block calls
    block_calls: int = 0


class Runtime:
    """One per accelerated transformer."""

    def __init__(self, policy: Policy, seed: int = 0, auto_num_steps: int | None = None,
                 auto_cfg_groups: int = 1) -> None:
        self.policy = policy
        self.auto_num_steps = auto_num_steps  # bare transformer: generations found from the timesteps
        self.auto_cfg_groups = auto_cfg_groups  # bare transformer: 2 when its batch is [uncond, cond]
        self.seed = seed
        self.context = AttentionContext()
        self._phase: str | None = None  # None: outside a generation, plain compute
        self._owner: int | None = None  # the thread running the generation
        self._busy = threading.Lock()
        self.num_steps = 0
        self.cfg_groups = 1
        self.summary: GenerationSummary | None = None
        self.last_summary: GenerationSummary | None = None
        self._branches: list[BranchState] = []
        self.kv_slots: list[list[LayerKV]] = []  # per attention layer, one LayerKV per branch
        self._speculated: list[list[tuple[float, torch.Tensor]]] = []
        self._speculated_change: list[list[tuple[float, torch.Tensor]]] = []
        self._last_timestep: float | None = None
        self._branch = 0
        self._plan: StepPlan | None = None
        self._step_timestep = 0.0
        self._generator = torch.Generator()
        self._started = 0.0
        self.observers: list = []  # called with a StepEvent per planned real step

    @property
    def phase(self) -> str | None:
        """The generation's phase, seen from the calling thread: other threads run plain."""
        return self._phase if self._owner == threading.get_ident() else None

    def new_kv_slots(self, layers: int) -> list[list[LayerKV]]:
        """One list of key/value slots per attention layer (grown per branch), for the adapter's processors."""
        self.kv_slots = [[] for _ in range(layers)]
        return self.kv_slots

    # -- generation boundaries ---------------------------------------------
    def start_generation(self, num_steps: int, cfg_groups: int = 1) -> None:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "specdiff: this accelerated transformer is already generating in another thread; its caches "
                "belong to one generation at a time: give each thread its own pipeline and transformer, "
                "or run the generations one after another"
            )
        self._owner = threading.get_ident()
        self.num_steps = num_steps
        self.cfg_groups = cfg_groups
        self.summary = GenerationSummary(self.policy.config.method, self.policy.config)
        self._speculated = []
        self._speculated_change = []
        self._generator.manual_seed(self.seed)
        self._started = time.perf_counter()
        self._enter_phase("real")

    def start_speculation(self) -> None:
        self._enter_phase("speculative")

    def end_speculation(self) -> None:
        self._speculated = [b.future for b in self._branches]
        self._speculated_change = [b.future_change for b in self._branches]
        self._enter_phase("real")

    def finish_generation(self) -> None:
        if self.summary is not None:
            self.summary.total_seconds = time.perf_counter() - self._started
            self.last_summary = self.summary.resolve()
        self.abort()

    def abort(self) -> None:
        """Drop every per-generation tensor (also after an error)."""
        if self._owner is not None and self._owner != threading.get_ident():
            return  # another thread's generation: not ours to end
        self._phase = None
        self._owner = None
        if self._busy.locked():
            self._busy.release()
        self.summary = None
        self._branches = []
        self._speculated = []
        self._speculated_change = []
        self._last_timestep = None
        self._plan = None
        self.context.enabled = False
        self.context.kv_branch = -1
        for slots in self.kv_slots:  # the caches are the largest per-generation tensors
            for slot in slots:
                slot.keys = slot.values = None
        self.context.active = None
        self.context.tap_sum = None

    def _auto_boundaries(self, timestep: float) -> None:
        """Bare transformer: a generation ends when every branch has run num_steps steps, or when
        the timestep rises (a call at the same timestep is another branch of the same step)."""
        done = bool(self._branches) and all(b.step >= self.auto_num_steps for b in self._branches)
        if self._owner is not None and self._owner != threading.get_ident() and done:
            self._owner = threading.get_ident()  # a finished generation of another thread: take it over
        if self.phase is not None:
            rising = self._last_timestep is not None and timestep > self._last_timestep
            if done or rising:
                self.finish_generation()
        if self.phase is None:
            self.start_generation(self.auto_num_steps, cfg_groups=self.auto_cfg_groups)

    def _enter_phase(self, phase: str) -> None:
        self._phase = phase
        self._branches = []
        self._last_timestep = None

    # -- steps -------------------------------------------------------------
    def _branch_for(self, timestep: float) -> BranchState:
        if self._last_timestep is not None and timestep == self._last_timestep:
            self._branch += 1
        else:
            self._branch = 0
        self._last_timestep = timestep
        while len(self._branches) <= self._branch:
            # the speculative pass always measures its tokens' change: a few dense steps, one norm each
            track = self.policy.reads_observed_change or self.phase == "speculative"
            state = BranchState(history=TokenHistory(track_change=track))
            for slots in self.kv_slots:  # each layer's processor holds its own list of slots
                while len(slots) <= len(self._branches):
                    slots.append(LayerKV())
            if self._speculated:
                # a speculative pass without a CFG branch serves every branch with its maps
                state.future = self._speculated[min(len(self._branches), len(self._speculated) - 1)]
                state.future_change = self._speculated_change[min(len(self._branches), len(self._speculated_change) - 1)]
            self._branches.append(state)
        return self._branches[self._branch]

    def begin_step(self, timestep: float, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Plan this call; return (B, n) image tokens to run, or None for all."""
        ctx = self.context
        if self.auto_num_steps is not None:
            self._auto_boundaries(timestep)
        if self.phase is None:
            ctx.enabled = False
            return None
        tic = time.perf_counter()
        branch = self._branch_for(timestep)
        if branch.history.outputs and branch.history.outputs[0].shape[:2] != (batch, num_tokens):
            raise RuntimeError(
                f"the batch or image size changed inside one generation "
                f"({tuple(branch.history.outputs[0].shape[:2])} -> {(batch, num_tokens)})"
            )
        if self.phase == "speculative":
            plan = StepPlan()
        else:
            signals = StepSignals(
                step=branch.step,
                num_steps=self.num_steps,
                timestep=timestep,
                batch=batch,
                num_tokens=num_tokens,
                device=device,
                attention=rows_for(branch.attention, batch),
                future=lambda t, b=branch: rows_for(nearest_future(b.future, t), batch),
                future_change=lambda t, b=branch: rows_for(nearest_future(b.future_change, t), batch),
                cached_count=branch.history.cached_count,
                last_outputs=branch.history.outputs,
                observed_change=branch.history.observed_change,
                cfg_groups=self.cfg_groups if batch % max(self.cfg_groups, 1) == 0 else 1,
                generator=self._generator,
            )
            plan = self.policy.plan(signals)
            if plan.compute is not None and not branch.history.outputs:
                plan = StepPlan()  # nothing cached yet: the first step always runs every token
            for observer in self.observers:
                observer(StepEvent(self._branch, branch.step, timestep, signals, plan))
        self._plan = plan
        self._step_timestep = timestep
        ctx.enabled = True
        ctx.real_phase = self.phase == "real"
        ctx.active = plan.compute
        ctx.kv_branch = self._branch if self.policy.reads_kv_cache else -1  # no caches for methods that never read them
        ctx.tap_seconds = 0.0
        taps = self.phase == "speculative" or self.policy.needs_attention_after(branch.step, self.num_steps)
        ctx.tap_queries = self.policy.tap_queries if taps else 0
        # one fp32 buffer the layers add into in place (the same tensor for every layer of the step); with
        # fewer rows than the batch the taps read only the last rows, a CFG batch's conditional half
        cfg_batched = (self.cfg_groups == 2 and batch % 2 == 0
                       and (self.phase == "real" or self.policy.speculative_cfg))
        tapped_rows = batch // 2 if cfg_batched and not self.policy.tap_cfg else batch
        ctx.tap_sum = torch.zeros(tapped_rows, num_tokens, device=device) if taps and ctx.tap_queries > 0 else None
        ctx.tap_include_text = self.policy.tap_include_text
        self._scoring = time.perf_counter() - tic
        return plan.compute

    def run_block(self, index: int, num_blocks: int, block, tokens: torch.Tensor, text: torch.Tensor):
        """Run transformer block `index` as block(tokens, text) -> (text, tokens), or let a
        block-level policy (FORA, TaylorSeer, ToCa, first-block cache) stand in for it."""
        # the thread-local context, not `phase`: compiled blocks cannot trace threading.get_ident, and
        # a call from another thread sees its own, disabled context anyway
        if not (self.context.enabled and self.context.real_phase) or not self.policy.block_level:
            return block(tokens, text)
        branch = self._branches[self._branch]
        if branch.block_state is None:
            branch.block_state = self.policy.new_block_state()
        call = BlockCall(index, num_blocks, branch.step, self.num_steps, tokens, text, block)
        result = self.policy.run_block(branch.block_state, call)
        branch.block_work += result.work
        branch.block_calls += 1
        return result.text, result.tokens

    def _blocks_computed(self, branch: BranchState) -> float | None:
        """Share of block work done this step (block-level policies, real phase), then reset."""
        if not self.policy.block_level or self.phase != "real" or not branch.block_calls:
            return None
        share = branch.block_work / branch.block_calls
        branch.block_work, branch.block_calls = 0.0, 0
        return share

    def end_step(self, computed: torch.Tensor) -> torch.Tensor:
        """Take (B, n, P) outputs of the active tokens; return the full (B, N, P) grid."""
        ctx = self.context
        if self.phase is None:
            return computed
        tic = time.perf_counter()
        branch = self._branches[self._branch]
        plan = self._plan
        had_three = len(branch.history) >= HISTORY_LENGTH
        output = branch.history.assemble(computed, plan.compute, plan.reuse, self._step_timestep)
        branch.history.record(output, plan.compute, self._step_timestep)
        tapped = ctx.tap_sum is not None
        if tapped and self.phase == "speculative":
            branch.future.append((self._step_timestep, ctx.tap_sum))
        if self.phase == "speculative" and branch.history.observed_change is not None:
            branch.future_change.append((self._step_timestep, branch.history.observed_change))
        branch.attention = ctx.tap_sum  # None when this step's taps were not needed
        n_tokens = output.shape[1]
        c1 = n_tokens if plan.compute is None else plan.compute.shape[1]
        reused, pending = float(n_tokens - c1), None  # fewer than three outputs yet: every cached token copies
        if plan.compute is not None and plan.reuse is not None and had_three:
            computed_mask = torch.zeros_like(plan.reuse).scatter(1, plan.compute, True)
            reused, pending = float("nan"), (plan.reuse & ~computed_mask).sum(1).float().mean()  # read by resolve()
        record = StepRecord(
            phase=self.phase, branch=self._branch, step=branch.step, timestep=self._step_timestep,
            kind="dense" if plan.compute is None else "sparse", computed=c1,
            reused=reused, approximated=n_tokens - c1 - reused,
            tokens=n_tokens, scoring_seconds=self._scoring + ctx.tap_seconds + time.perf_counter() - tic,
            blocks_computed=self._blocks_computed(branch), tapped=tapped,
        )
        self.summary.records.append(record)
        if pending is not None:
            self.summary.pending_reused.append((record, pending))
        branch.step += 1
        ctx.active = None
        ctx.tap_sum = None
        return output


def rows_for(scores: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Maps made without the CFG rows (the speculative pass's, or conditional-only taps) serve both
    halves ([uncond, cond] share a prompt order)."""
    if scores is None or scores.shape[0] == batch:
        return scores
    if batch % scores.shape[0]:
        raise RuntimeError(f"speculative maps for {scores.shape[0]} rows cannot serve a batch of {batch}")
    return scores.repeat(batch // scores.shape[0], 1)


def nearest_future(future: list[tuple[float, torch.Tensor]], timestep: float) -> torch.Tensor | None:
    """The speculative map at the closest timestep at or below `timestep`
    (next in denoising order); the last one when none lies ahead."""
    if not future:
        return None
    ahead = [(t, m) for t, m in future if t <= timestep]
    if not ahead:
        return min(future, key=lambda e: e[0])[1]
    return max(ahead, key=lambda e: e[0])[1]
