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
from specdiff.engine.buffers import BufferPool, write_host_values
from specdiff.engine.history import HISTORY_LENGTH, TokenHistory, approximation_weights, inverse_gap
from specdiff.engine.policy import DENSE, BlockCall, Policy, StepPlan, StepSignals


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
        if self.pending_reused and self.pending_reused[0][1].device.type != "meta":  # meta: no values (host-overhead runs)
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
            "method": self.method, "config": config_fields(self.config), "total_seconds": self.total_seconds,
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
        speculated = any(r.phase == "speculative" for r in self.records)  # methods that never speculate: no line
        speculation = (f"speculation {self.speculation_seconds:.3f} s ({100 * self.speculation_seconds / total:.1f}%); "
                       if speculated else "")
        return (
            f"total {self.total_seconds:.3f} s; {speculation}scoring and bookkeeping "
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


def config_fields(config) -> dict:
    """A config as plain JSON fields (tuples as lists), for results files."""
    if dataclasses.is_dataclass(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"repr": repr(config)}


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """What an observer sees of one planned real step: the signals the policy read and its plan."""

    branch: int  # 0, or 1 for a second call at the same timestep (FLUX true CFG)
    step: int
    timestep: float
    signals: StepSignals
    plan: StepPlan


@dataclasses.dataclass(frozen=True)
class PreparedStep:
    """Every host decision that shapes a step's device work: steps with equal PreparedSteps (and equal
    inputs' shapes) issue the same kernels on the same buffers, so one CUDA graph serves them all."""

    phase: str  # "speculative" or "real"
    branch: int
    dense: bool
    tap_rows: int  # rows whose attention the taps measure (0: no taps)
    history: int  # outputs stored before this step, at most HISTORY_LENGTH
    change_seen: bool  # the history holds an observed change
    attention: bool  # the previous step's taps are valid (the plan may read them)
    future: int  # index of the speculative map the plan reads (-1: none)
    future_change: int  # index of the speculative change map the plan reads (-1: none)
    kv_branch: int
    cfg_groups: int
    batch: int
    num_tokens: int
    device: torch.device


@dataclasses.dataclass
class BranchState:
    history: TokenHistory
    attention: torch.Tensor | None = None  # taps of the last step (a persistent buffer), None before any
    future: list[tuple[float, torch.Tensor]] = dataclasses.field(default_factory=list)
    # per speculative timestep, how fast each token's output moved since the previous speculative step
    future_change: list[tuple[float, torch.Tensor]] = dataclasses.field(default_factory=list)
    step: int = 0
    block_state: object = None  # a block-level policy's own state (Policy.new_block_state)
    block_work: float = 0.0  # block work done in the current step, summed over its block calls
    block_calls: int = 0


class Runtime:
    """One per accelerated transformer.

    A step runs in four parts: `prepare_step` (host: which branch, dense or sparse, taps, the policy's
    host inputs and the step's scalars written to the device), `run_plan` (device: the sparse plan, the
    taps buffer), `run_fill` (device: fill in the tokens that did not run, store the history) and
    `finish_step` (host: bookkeeping, the summary). `begin_step` / `end_step`, called by the adapter's
    hooks, run the first two and the last two; a step replayed from a CUDA graph runs only the device
    parts in the graph, and the graph runner calls the host parts around it. Every tensor a step keeps
    lives in `buffers` (or the layers' LayerKV slots) and is written in place.
    """

    def __init__(self, policy: Policy, seed: int = 0, auto_num_steps: int | None = None,
                 auto_cfg_groups: int = 1) -> None:
        self.policy = policy
        self.auto_num_steps = auto_num_steps  # bare transformer: generations found from the timesteps
        self.auto_cfg_groups = auto_cfg_groups  # bare transformer: 2 when its batch is [uncond, cond]
        self.seed = seed
        self.context = AttentionContext()
        self.buffers = BufferPool()
        self.keep_buffers = False  # True (CUDA graphs): buffers outlive a generation, for the next one
        self.defer_finish = False  # True while a graph runner calls finish_step itself
        self.generation = 0  # generations started so far
        self.calls: dict[int, bool] = {}  # threads with a transformer call in progress (the adapter's hooks)
        self._observing = False  # observers are being called (inside a call, on its thread)
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
        self._prepared: PreparedStep | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._plan: StepPlan | None = None
        self._step_timestep = 0.0
        self._scoring = 0.0
        # what the device parts of each kind of step reported (C1 count, whether C2 is counted): the same
        # for every step of a kind, and known on the host when a step is replayed without running them
        self._step_facts: dict[PreparedStep, tuple[int, bool]] = {}
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
    def running(self) -> str | None:
        """What is running on this transformer now, in words (None: nothing): a pipeline's generation,
        or a call of a bare transformer (between the calls of its loop nothing runs)."""
        owner, here = self._owner, threading.get_ident()
        # a call on this thread can only be running if its own observers are calling back (a call
        # interrupted by KeyboardInterrupt leaves an entry that no hook clears: not counted here)
        others = [thread for thread in list(self.calls) if thread != here]
        if (self.auto_num_steps is None and owner is not None) or self._observing or others:
            thread = owner if owner is not None else (others[0] if others else here)
            where = "this thread" if thread == here else f"thread {thread}"
            return f"a {self.policy.config.method} generation (started in {where})"
        return None

    def start_generation(self, num_steps: int, cfg_groups: int = 1) -> None:
        if not self._busy.acquire(blocking=False):
            if self._owner == threading.get_ident():
                raise RuntimeError(
                    "specdiff: a generation is already running in this thread on this accelerated transformer "
                    "(a pipeline call from inside a callback or observer?); call it after the running one returns")
            raise RuntimeError(
                "specdiff: this accelerated transformer is already generating in another thread; its caches "
                "belong to one generation at a time: give each thread its own pipeline and transformer, "
                "or run the generations one after another"
            )
        self._owner = threading.get_ident()
        self.generation += 1
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
        """End the generation and drop its per-generation state (also after an error); the buffers
        too unless keep_buffers."""
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
        self._prepared = None
        self._inputs = {}
        self.defer_finish = False
        self._observing = False
        self.calls.pop(threading.get_ident(), None)
        self.context.enabled = False
        self.context.kv_branch = -1
        self.context.active = None
        self.context.tap_sum = None
        if not self.keep_buffers:
            self.release_buffers()

    def buffer_addresses(self) -> tuple:
        """The data pointer of every persistent tensor (the pool and the key/value slots)."""
        kv = tuple(None if slot.keys is None else (slot.keys.data_ptr(), slot.values.data_ptr())
                   for slots in self.kv_slots for slot in slots)
        return tuple(sorted(self.buffers.addresses().items())), kv

    def release_buffers(self) -> None:
        """Free every persistent buffer (the key/value caches are the largest)."""
        self.buffers.clear()
        for slots in self.kv_slots:
            for slot in slots:
                slot.keys = slot.values = None

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
            name = (self.phase, len(self._branches))  # buffers per phase and branch: shapes differ between them
            state = BranchState(history=TokenHistory(track_change=track, buffers=self.buffers, name=name))
            for slots in self.kv_slots:  # each layer's processor holds its own list of slots
                while len(slots) <= len(self._branches):
                    slots.append(LayerKV())
            if self._speculated:
                # a speculative pass without a CFG branch serves every branch with its maps
                state.future = self._speculated[min(len(self._branches), len(self._speculated) - 1)]
                state.future_change = self._speculated_change[min(len(self._branches), len(self._speculated_change) - 1)]
            self._branches.append(state)
        return self._branches[self._branch]

    def _signals(self, branch: BranchState, batch: int, num_tokens: int, device, on_device: bool) -> StepSignals:
        """What the policy reads. on_device=False: the host's view for dense_step (the maps as stored,
        no device work); True: maps with a row per batch row, for select (device work)."""
        rows = (lambda scores: rows_for(scores, batch)) if on_device else (lambda scores: scores)
        return StepSignals(
            step=branch.step,
            num_steps=self.num_steps,
            timestep=self._step_timestep,
            batch=batch,
            num_tokens=num_tokens,
            device=device,
            attention=rows(branch.attention),
            future=lambda t, b=branch: rows(nearest_future(b.future, t)),
            future_change=lambda t, b=branch: rows(nearest_future(b.future_change, t)),
            cached_count=branch.history.cached_count,
            last_outputs=branch.history.outputs,
            observed_change=branch.history.observed_change,
            cfg_groups=self.cfg_groups if batch % max(self.cfg_groups, 1) == 0 else 1,
            generator=self._generator,
            inputs=self._inputs if on_device else {},
        )

    def begin_step(self, timestep: float, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Plan this call; return (B, n) image tokens to run, or None for all."""
        prepared = self._prepared
        if prepared is None:
            prepared = self.prepare_step(timestep, batch, num_tokens, device)
            if prepared is None:
                return None
        elif (prepared.batch, prepared.num_tokens) != (batch, num_tokens):
            raise RuntimeError(f"specdiff: the step was prepared for {prepared.batch} x {prepared.num_tokens} image "
                               f"tokens but the model embedded {batch} x {num_tokens}")
        return self.run_plan()

    def prepare_step(self, timestep: float, batch: int, num_tokens: int, device: torch.device) -> PreparedStep | None:
        """Host part of planning a call: its PreparedStep, or None for a plain call."""
        ctx = self.context
        if self.auto_num_steps is not None:
            self._auto_boundaries(timestep)
        if self.phase is None:
            ctx.enabled = False
            return None
        tic = time.perf_counter()
        branch = self._branch_for(timestep)
        history = branch.history
        if history.shape is not None and tuple(history.shape[:2]) != (batch, num_tokens):
            raise RuntimeError(
                f"the batch or image size changed inside one generation "
                f"({tuple(history.shape[:2])} -> {(batch, num_tokens)})"
            )
        self._step_timestep = timestep
        self._inputs = {}
        dense, future, future_change = True, -1, -1
        if self.phase == "real":
            signals = self._signals(branch, batch, num_tokens, device, on_device=False)
            # nothing cached yet: the first step always runs every token
            dense = not history.count or self.policy.dense_step(signals)
            if not dense:
                future, future_change = nearest_index(branch.future, timestep), nearest_index(branch.future_change, timestep)
                for name, value in self.policy.step_inputs(signals).items():
                    buffer = self.buffers.get(("input", name), value.shape, value.dtype, device)
                    write_host_values(buffer, value)
                    self._inputs[name] = buffer
        self._write_step_scalars(history, dense, timestep, device)
        taps = self.phase == "speculative" or self.policy.needs_attention_after(branch.step, self.num_steps)
        tap_queries = self.policy.tap_queries if taps else 0
        # with fewer rows than the batch the taps read only a CFG batch's conditional half (last, or first)
        cfg_batched = (self.cfg_groups == 2 and batch % 2 == 0
                       and (self.phase == "real" or self.policy.speculative_cfg))
        tap_rows = (batch // 2 if cfg_batched and not self.policy.tap_cfg else batch) if tap_queries > 0 else 0
        self._prepared = PreparedStep(
            phase=self.phase, branch=self._branch, dense=dense, tap_rows=tap_rows, history=len(history),
            change_seen=history.observed_change is not None, attention=branch.attention is not None,
            future=future, future_change=future_change,
            # no caches for methods that never read them, nor in the speculative pass (dense only)
            kv_branch=self._branch if self.policy.reads_kv_cache and self.phase == "real" else -1,
            cfg_groups=self.cfg_groups, batch=batch, num_tokens=num_tokens, device=torch.device(device),
        )
        self._scoring = time.perf_counter() - tic
        return self._prepared

    def _write_step_scalars(self, history: TokenHistory, dense: bool, timestep: float, device) -> None:
        """The step's host scalars, into one device buffer the device parts read: the approximation
        weights of the last three outputs and 1 / the timestep distance to the last output."""
        weights = not dense and len(history) >= HISTORY_LENGTH
        gap = history.track_change and history.count > 0
        if not (weights or gap):
            return
        values = approximation_weights(history.timesteps[:HISTORY_LENGTH], timestep) if weights else [0.0] * 3
        values.append(inverse_gap(history.timesteps[0], timestep) if gap else 0.0)
        write_host_values(self.buffers.get(("step scalars",), (4,), torch.float32, device), values)

    def run_plan(self) -> torch.Tensor | None:
        """Device part of planning: the sparse plan, the taps buffer; returns the tokens to run."""
        ctx = self.context
        prepared = self._prepared
        branch = self._branches[prepared.branch]
        tic = time.perf_counter()
        plan = DENSE
        if prepared.phase == "real":
            if not prepared.dense or self.observers:
                signals = self._signals(branch, prepared.batch, prepared.num_tokens, prepared.device, on_device=True)
            if not prepared.dense:
                plan = self.policy.select(signals)
                self._step_facts[prepared] = (plan.compute.shape[1], plan.reuse is not None and prepared.history >= HISTORY_LENGTH)
            if self.observers:
                event = StepEvent(prepared.branch, branch.step, self._step_timestep, snapshot(signals), plan)
                self._observing = True
                try:
                    for observer in self.observers:
                        observer(event)
                finally:
                    self._observing = False
        self._plan = plan
        ctx.enabled = True
        ctx.real_phase = prepared.phase == "real"
        ctx.active = plan.compute
        ctx.kv_branch = prepared.kv_branch
        ctx.tap_seconds = 0.0
        ctx.tap_queries = self.policy.tap_queries if prepared.tap_rows else 0
        ctx.tap_sum = None
        if prepared.tap_rows:
            # one fp32 buffer the layers add into in place (the same tensor for every layer of the step),
            # zeroed after the plan read the previous step's taps from it
            ctx.tap_sum = self._taps_buffer(prepared).zero_()
        ctx.tap_include_text = self.policy.tap_include_text
        self._scoring += time.perf_counter() - tic
        return plan.compute

    def _taps_buffer(self, prepared: PreparedStep) -> torch.Tensor:
        return self.buffers.get(("taps", prepared.phase, prepared.branch), (prepared.tap_rows, prepared.num_tokens),
                                torch.float32, prepared.device)

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
        if self.phase is None or self._prepared is None:
            return computed
        output = self.run_fill(computed)
        if not self.defer_finish:
            self.finish_step()
        return output

    def run_fill(self, computed: torch.Tensor) -> torch.Tensor:
        """Device part of ending a step: the full grid, stored in the history; the maps the step made."""
        tic = time.perf_counter()
        ctx, prepared, plan = self.context, self._prepared, self._plan
        branch = self._branches[prepared.branch]
        history = branch.history
        scalars = self.buffers.get(("step scalars",), (4,), torch.float32, computed.device)
        weights = scalars[:HISTORY_LENGTH] if prepared.history >= HISTORY_LENGTH else None
        output = history.assemble(computed, plan.compute, plan.reuse, weights)
        history.store(output, plan.compute, scalars[HISTORY_LENGTH])
        if prepared.phase == "speculative":  # the maps the real pass reads, kept per speculative step
            if ctx.tap_sum is not None:
                copy_into(self.buffers, ("future", prepared.branch, len(branch.future)), ctx.tap_sum)
            if history.track_change and history.count:  # this step's change (store just wrote it)
                copy_into(self.buffers, ("future change", prepared.branch, len(branch.future_change)), history._change)
        if self._step_facts.get(prepared, (0, False))[1]:
            # C2 count, read by GenerationSummary.resolve at the end (no host sync per step)
            computed_mask = torch.zeros_like(plan.reuse).scatter_(1, plan.compute, True)
            count = (plan.reuse & ~computed_mask).sum(1).float().mean()
            self.buffers.get(("C2 count", prepared.branch), (), torch.float32, count.device).copy_(count)
        self._scoring += time.perf_counter() - tic
        return output

    def finish_step(self) -> None:
        """Host part of ending a step: the history's bookkeeping, the maps' validity, the summary."""
        tic = time.perf_counter()
        ctx, prepared = self.context, self._prepared
        branch = self._branches[prepared.branch]
        history = branch.history
        if prepared.phase == "speculative":
            if prepared.tap_rows:
                branch.future.append((self._step_timestep, self.buffers.get(
                    ("future", prepared.branch, len(branch.future)), (prepared.tap_rows, prepared.num_tokens),
                    torch.float32, prepared.device)))
            if history.track_change and history.count:
                branch.future_change.append((self._step_timestep, self.buffers.get(
                    ("future change", prepared.branch, len(branch.future_change)),
                    (prepared.batch, prepared.num_tokens), torch.float32, prepared.device)))
        history.advance(self._step_timestep)
        # the taps buffer holds this step's taps when it was tapped; None when they were not needed
        branch.attention = self._taps_buffer(prepared) if prepared.tap_rows else None
        n_tokens = prepared.num_tokens
        c1, counted = (n_tokens, False) if prepared.dense else self._step_facts[prepared]
        reused = float(n_tokens - c1)  # fewer than three outputs yet: every cached token copies
        if counted:
            reused = float("nan")  # read by resolve()
        record = StepRecord(
            phase=prepared.phase, branch=prepared.branch, step=branch.step, timestep=self._step_timestep,
            kind="dense" if prepared.dense else "sparse", computed=c1,
            reused=reused, approximated=n_tokens - c1 - reused, tokens=n_tokens,
            scoring_seconds=self._scoring + ctx.tap_seconds + time.perf_counter() - tic,
            blocks_computed=self._blocks_computed(branch), tapped=prepared.tap_rows > 0,
        )
        self.summary.records.append(record)
        if counted:
            count = self.buffers.get(("C2 count", prepared.branch), (), torch.float32, prepared.device)
            self.summary.pending_reused.append((record, count.clone()))
        branch.step += 1
        ctx.active = None
        ctx.tap_sum = None
        self._prepared = None


def copy_into(buffers: BufferPool, name: tuple, source: torch.Tensor) -> torch.Tensor:
    """source copied into the persistent buffer `name`."""
    return buffers.get(name, source.shape, source.dtype, source.device).copy_(source)


def snapshot(signals: StepSignals) -> StepSignals:
    """Signals an observer may keep: copies of the buffers that later steps overwrite in place."""
    copy = lambda t: None if t is None else t.clone()  # noqa: E731
    return dataclasses.replace(
        signals, attention=copy(signals.attention), cached_count=copy(signals.cached_count),
        observed_change=copy(signals.observed_change), last_outputs=[o.clone() for o in signals.last_outputs],
        inputs={k: v.clone() for k, v in signals.inputs.items()})


def rows_for(scores: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Maps made without the CFG rows (the speculative pass's, or conditional-only taps) serve both
    halves ([uncond, cond] share a prompt order)."""
    if scores is None or scores.shape[0] == batch:
        return scores
    if batch % scores.shape[0]:
        raise RuntimeError(f"speculative maps for {scores.shape[0]} rows cannot serve a batch of {batch}")
    return scores.repeat(batch // scores.shape[0], 1)


def nearest_index(future: list[tuple[float, torch.Tensor]], timestep: float) -> int:
    """Index of the speculative map at the closest timestep at or below `timestep` (next in denoising
    order); the one at the smallest timestep when none lies ahead; -1 when there is none."""
    if not future:
        return -1
    ahead = [i for i, (t, _) in enumerate(future) if t <= timestep]
    if not ahead:
        return min(range(len(future)), key=lambda i: future[i][0])
    return max(ahead, key=lambda i: future[i][0])


def nearest_future(future: list[tuple[float, torch.Tensor]], timestep: float) -> torch.Tensor | None:
    """The speculative map nearest_index picks, or None."""
    index = nearest_index(future, timestep)
    return None if index < 0 else future[index][1]
