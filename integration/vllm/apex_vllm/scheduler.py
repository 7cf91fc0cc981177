"""APEX's scheduler for vLLM: vLLM's own v1 Scheduler, with each request's KV
blocks on one tier that APEX's scheduler chooses (apex_sched_place through
apex_vllm.place).

    vllm serve MODEL --attention-backend CUSTOM \\
        --scheduler-cls apex_vllm.scheduler.ApexScheduler
    LLM(MODEL, attention_config={"backend": "CUSTOM"},
        scheduler_cls="apex_vllm.scheduler.ApexScheduler")

vLLM's scheduler keeps deciding which requests run and admits against the
whole pool (device + host blocks). What this class adds, through vLLM's
extension points only (the scheduler class, its KV-cache manager's block
pool), without patching vLLM's files:
  - the pool's free queue becomes two queues, one per tier (TwoTierFreeQueue);
    a request's new blocks come from its tier's queue (the other tier's only
    when its own is empty: correct, slower, see apex_paged_attention);
  - admission: a new request's tier is chosen when vLLM first allocates for
    it; a request the plan would leave idle gets no blocks (vLLM keeps it
    waiting, as when the pool is full);
  - migrations at the start of each step (the plan's spills and promotions)
    and when a device-tier request outgrows the device within a step: the
    request's blocks are replaced by blocks of the
    other tier in vLLM's manager, APEX copies the KV (apex_paged_copy_blocks),
    and the step's SchedulerOutput hands the worker the request's whole new
    block list (vLLM's "resumed" form of CachedRequestData, which replaces the
    worker's row instead of appending to it).

Where the copy runs: in the worker, which owns APEX's context (this process
with UniProcExecutor, another with MultiprocExecutor, the CPU platform's
executor under `vllm serve`). The scheduler sends the copies through
apex_vllm.copies; the worker applies them when it builds the step's
attention metadata, before the step's first attention call (the ordering
argument is in that module). Ray or external launchers (workers possibly on
other machines): tiers are chosen at admission, migrations are off (logged).
"""
import os
import time

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue
from vllm.v1.core.sched.scheduler import Scheduler

from . import copies, place, tiers
from .tiers import DEVICE, HOST

logger = init_logger("vllm.apex_vllm")

_TIER = {DEVICE: place.TIER_DEVICE, HOST: place.TIER_HOST}


class TwoTierFreeQueue:
    """vLLM's free-block queue (FreeKVCacheBlockQueue's interface as
    BlockPool uses it), as one queue per tier: ids below device_blocks are
    the device tier's. Pops come from the tier in `prefer`, then the other."""

    def __init__(self, free_blocks, device_blocks: int):
        self.device_blocks = device_blocks
        self.queues = {DEVICE: FreeKVCacheBlockQueue([b for b in free_blocks
                                                      if b.block_id < device_blocks]),
                       HOST: FreeKVCacheBlockQueue([b for b in free_blocks
                                                    if b.block_id >= device_blocks])}
        self.prefer = HOST

    def tier_of(self, block) -> str:
        return DEVICE if block.block_id < self.device_blocks else HOST

    def free(self, tier: str) -> int:
        return self.queues[tier].num_free_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.free(DEVICE) + self.free(HOST)

    def _order(self):
        return (self.prefer, HOST if self.prefer == DEVICE else DEVICE)

    def popleft(self):
        for t in self._order():
            if self.free(t):
                return self.queues[t].popleft()
        raise ValueError("No free blocks available")

    def popleft_n(self, n: int):
        out = []
        for t in self._order():
            take = min(n - len(out), self.free(t))
            if take:
                out += self.queues[t].popleft_n(take)
        return out

    def pop_tier_n(self, tier: str, n: int):
        """n blocks of tier exactly (the caller checked free(tier) >= n)."""
        return self.queues[tier].popleft_n(n)

    def remove(self, block):
        self.queues[self.tier_of(block)].remove(block)

    def append(self, block):
        self.queues[self.tier_of(block)].append(block)

    def _split(self, blocks):
        d = [b for b in blocks if b.block_id < self.device_blocks]
        h = [b for b in blocks if b.block_id >= self.device_blocks]
        return d, h

    def append_n(self, blocks):
        d, h = self._split(blocks)
        self.queues[DEVICE].append_n(d)
        self.queues[HOST].append_n(h)

    def prepend_n(self, blocks):
        d, h = self._split(blocks)
        self.queues[DEVICE].prepend_n(d)
        self.queues[HOST].prepend_n(h)

    def get_all_free_blocks(self):
        return self.queues[DEVICE].get_all_free_blocks() + self.queues[HOST].get_all_free_blocks()


class ApexScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.apex_stats = tiers.new_stats()
        self.apex_tier: dict[str, str] = {}
        self._apex_remapped: set[str] = set()
        self._apex_len: dict[str, int] = {}  # tokens a request's blocks cover after this step's allocation
        self._apex_t_step = None  # when the last placed step began (apex_sched_observe)
        self._apex_last_written = None
        self.apex_active = False
        backend = getattr(getattr(self.vllm_config, "attention_config", None), "backend", None)
        if getattr(backend, "name", backend) != "CUSTOM":
            logger.info("APEX scheduler: the attention backend is %s, not CUSTOM: vLLM's own "
                        "scheduling", backend)
            return
        cfg = tiers.resolve(self.vllm_config)
        if cfg.fallback or not cfg.device_blocks:
            return  # no device tier (or vLLM's own backend): vLLM's scheduling as is
        pool = self.kv_cache_manager.block_pool
        if cfg.device_blocks >= pool.num_gpu_blocks:
            raise ValueError(f"APEX: the device tier ({cfg.device_blocks} blocks) is not smaller "
                             f"than vLLM's pool ({pool.num_gpu_blocks} blocks); lower "
                             "APEX_VLLM_DEVICE_BLOCKS / APEX_VLLM_DEVICE_MB")
        self.apex_active = True
        self.apex_device_blocks = cfg.device_blocks
        self.apex_queue = TwoTierFreeQueue(pool.free_block_queue.get_all_free_blocks(),
                                           cfg.device_blocks)
        pool.free_block_queue = self.apex_queue
        self.apex_host_max = int(os.environ.get("APEX_VLLM_HOST_MAX_SEQS", "0") or 0)
        # APEX's scheduler, with its own small context (apex_vllm.place): the
        # worker's context, which holds the KV, may be in another process.
        mc = self.vllm_config.model_config
        self.apex_max_len = mc.max_model_len
        self.apex_placer = place.Placer(tiers.model_geometry(self.vllm_config), mc.max_model_len,
                                        int(os.environ.get("APEX_MAX_BATCH", "256")),
                                        place.model_shapes(self.vllm_config))
        # Copies reach the worker through a file (apex_vllm.copies): the
        # worker must be on this machine.
        backend_kind = self.vllm_config.parallel_config.distributed_executor_backend
        self.apex_migrate = backend_kind in ("uni", "mp")
        self.apex_stats.update(device_blocks=cfg.device_blocks, pool_blocks=pool.num_gpu_blocks,
                               migrations="on" if self.apex_migrate else
                               f"off (executor {backend_kind}: workers may be on other machines)")
        if self.apex_migrate:
            copies.reset()
        else:
            logger.warning("APEX scheduler: executor %s; tiers are chosen at admission, requests "
                           "are not migrated", backend_kind)
        self._apex_deferred: list = []  # a promotion's host sources, freed after the worker copied them
        self._apex_forward_ran = False
        manager = self.kv_cache_manager
        self._apex_allocate = manager.allocate_slots
        self._apex_free = manager.free
        manager.allocate_slots = self._allocate_slots
        manager.free = self._free
        tiers.write_stats(self.apex_stats)

    # ------------------------------------------------------------- helpers

    def _managers(self):
        return self.kv_cache_manager.coordinator.single_type_managers

    def _blocks(self, rid: str):
        return [b for m in self._managers() for b in m.req_to_blocks.get(rid, ())
                if not b.is_null]

    def _ordered(self, exclude: str | None = None):
        """The running requests in vLLM's priority order, oldest first (its
        priority policy's key; FCFS: all priorities 0, so arrival order)."""
        return sorted((r for r in self.running if r.request_id != exclude),
                      key=lambda r: (r.priority, r.arrival_time))

    def _item(self, request, length=None, tier=None):
        """One apex_place_item: (KV length, tier, state). vLLM runs every
        running request each step, so all are decoding."""
        rid = request.request_id
        if length is None:
            length = self._apex_len.get(rid, request.num_computed_tokens)
        return (min(length, self.apex_max_len), _TIER[tier or self.apex_tier.get(rid, HOST)],
                place.DECODING)

    def _device_room(self, items, extra: int = 0) -> int:
        """The device blocks these items may use: the free ones plus those
        the device items hold (as apex_sched_place counts them: a block per
        block_tokens of length), plus `extra`."""
        bs = self.block_size
        return self.apex_queue.free(DEVICE) + extra + sum(
            tiers.cdiv(ln, bs) for ln, t, _ in items if t == place.TIER_DEVICE)

    def _place(self, kind: str, items, room: int):
        """apex_sched_place: the tier of each item, and the plan."""
        out, plan = self.apex_placer.place(items, room)
        st = self.apex_stats
        st["decided"][kind] += 1
        st["decisions"] = self.apex_placer.calls
        name = plan.strategy.decode() if plan.strategy else "?"
        st["strategies"][name] = st["strategies"].get(name, 0) + 1
        return out, plan

    def _move(self, rid: str, tier: str) -> bool:
        """Moves request rid's blocks, whole, to tier: new ids in vLLM's
        manager, the KV copied by APEX, the old blocks freed."""
        q, pool = self.apex_queue, self.kv_cache_manager.block_pool
        old = self._blocks(rid)
        if not old or q.free(tier) < len(old) or any(b.ref_cnt > 1 for b in old):
            # No room there now, or blocks another request shares (a prefix
            # hit): the move waits for a later plan.
            self.apex_stats["moves_waiting"] += 1
            return False
        new = q.pop_tier_n(tier, len(old))
        for b in new:
            if pool.enable_caching:
                pool._maybe_evict_cached_block(b)  # a free block may still carry a stale hash
            b.ref_cnt += 1
        copies.send([b.block_id for b in old], [b.block_id for b in new])
        remap = {o.block_id: n for o, n in zip(old, new)}
        for m in self._managers():
            blocks = m.req_to_blocks.get(rid)
            if blocks:
                blocks[:] = [remap.get(b.block_id, b) if not b.is_null else b for b in blocks]
        for o, n in zip(old, new):
            if o.block_hash is not None:
                pool.move_block_hashes(o, n)  # prefix-cache entries follow the KV
        if tier == HOST:
            # A spill's sources are device-tier blocks: free at once, so the
            # plan's room is there for this step's growth. Safe because the
            # worker applies the copies before the step's first KV write, and
            # vLLM's zeroing of a block it hands out reaches only vLLM's own
            # pages of a device id, which hold no KV (APEX's device tier does).
            pool.free_blocks(old)
        else:
            # A promotion's sources are host-tier blocks, i.e. vLLM's tensor:
            # freed once the worker has copied them (after the next step with
            # a forward): until then no other request may get, and vLLM's
            # worker zero, a source block.
            self._apex_deferred.append(old)
        self.apex_tier[rid] = tier
        self._apex_remapped.add(rid)
        self.apex_stats["blocks_copied"] += len(old)
        self.apex_stats["promotions" if tier == DEVICE else "spills"] += 1
        return True

    # --------------------------------------------------- vLLM's entry points

    def _allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        rid, q = request.request_id, self.apex_queue
        bs = self.block_size
        tier = self.apex_tier.get(rid)
        total = (request.num_computed_tokens + kwargs.get("num_new_computed_tokens", 0) +
                 num_new_tokens + kwargs.get("num_lookahead_tokens", 0))
        if tier is None:
            # A new (or resumed) request: the plan over the running ones and
            # it, last in priority, as a host decoder of its whole length.
            running = [self._item(r) for r in self._ordered(exclude=rid)]
            items = running + [self._item(request, max(total, request.num_tokens), HOST)]
            out, plan = self._place("admit", items, self._device_room(running))
            if out[-1] == place.TIER_DEVICE:
                tier = DEVICE  # the plan promotes it: device room for it and its growth
            else:
                on_host = sum(1 for ln, t, _ in running if t == place.TIER_HOST)
                if self.apex_host_max and on_host >= self.apex_host_max:
                    self.apex_stats["waits"]["host_cap"] += 1
                    return None
                if plan.n_host_idle > 0:
                    # The plan's CPU cohort leaves it out (it is the last host
                    # decoder): running it would lower the step's decode rate.
                    self.apex_stats["waits"]["plan"] += 1
                    return None
                tier = HOST
        elif tier == DEVICE and self.apex_migrate:
            held = len(self._blocks(rid))
            needs = max(0, tiers.cdiv(total, bs) - held)
            if needs > q.free(DEVICE):
                # More than the step's plan foresaw (one token of growth):
                # where would the plan put it, its blocks counted free?
                reqs = self._ordered()
                items = [self._item(r, total, HOST) if r.request_id == rid else self._item(r)
                         for r in reqs]
                out, _ = self._place("outgrown", items, self._device_room(items, held))
                k = next((i for i, r in enumerate(reqs) if r.request_id == rid), None)
                if (k is None or out[k] == place.TIER_HOST) and self._move(rid, HOST):
                    tier = HOST
        q.prefer = tier
        blocks = self._apex_allocate(request, num_new_tokens, *args, **kwargs)
        if blocks is not None:
            self._apex_len[rid] = total
            if rid not in self.apex_tier:
                self.apex_tier[rid] = tier
                self.apex_stats["admitted"][tier] += 1
        return blocks

    def _free(self, request):
        rid = request.request_id
        self.apex_tier.pop(rid, None)
        self._apex_remapped.discard(rid)
        self._apex_len.pop(rid, None)
        return self._apex_free(request)

    def schedule(self, *args, **kwargs):
        if not self.apex_active:
            return super().schedule(*args, **kwargs)
        now = time.monotonic()
        if self._apex_t_step is not None:
            # vLLM's last step, schedule to schedule: the plan's correction
            self.apex_placer.observe(now - self._apex_t_step)
        calls = self.apex_placer.calls
        self._apex_len = {}
        self.apex_stats["steps"] += 1
        if self._apex_deferred and self._apex_forward_ran:
            pool = self.kv_cache_manager.block_pool
            for blocks in self._apex_deferred:
                pool.free_blocks(blocks)
            self._apex_deferred = []
        if self.apex_migrate and self.running:
            reqs = self._ordered()
            items = [self._item(r) for r in reqs]
            out, _ = self._place("step", items, self._device_room(items))
            moves = [(r.request_id, t) for r, (_, cur, _), t in zip(reqs, items, out) if t != cur]
            # spills first: the room they free is what promotions take
            for rid, t in sorted(moves, key=lambda m: m[1] != place.TIER_HOST):
                self._move(rid, DEVICE if t == place.TIER_DEVICE else HOST)
        out = super().schedule(*args, **kwargs)
        self._hand_over(out)
        # A step with tokens runs a forward, whose metadata build applies the
        # copies sent so far (apex_vllm.copies).
        self._apex_forward_ran = out.total_num_scheduled_tokens > 0
        self._apex_t_step = now if (self._apex_forward_ran and
                                    self.apex_placer.calls > calls) else None
        return out

    def shutdown(self) -> None:
        super().shutdown()
        if self.apex_active:
            self.apex_placer.close()

    def _hand_over(self, out):
        """The worker learns a moved request's new block ids: its whole list,
        flagged as resumed (the worker then replaces its row). Copy-on-write
        copies vLLM asks for that touch a device-tier block are APEX's to
        make (vLLM's worker copies its own tensor, which does not hold the
        device tier); host-tier pairs stay vLLM's (its tensor is the host tier)."""
        cached = out.scheduled_cached_reqs
        moved = [i for i, rid in enumerate(cached.req_ids) if rid in self._apex_remapped]
        if moved:
            resumed = set(cached.resumed_req_ids)
            for i in moved:
                rid = cached.req_ids[i]
                resumed.add(rid)
                cached.new_block_ids[i] = self.kv_cache_manager.get_block_ids(rid)
                self._apex_remapped.discard(rid)
                self.apex_stats["remapped_to_worker"] += 1
            cached.resumed_req_ids = resumed
        cow = out.kv_cache_block_copies
        if cow:
            d = self.apex_device_blocks
            mine = [c for c in cow if c[0] < d or c[1] < d]
            if mine:
                copies.send([c[0] for c in mine], [c[1] for c in mine])
                out.kv_cache_block_copies = [c for c in cow if c[0] >= d and c[1] >= d] or None
        on = {DEVICE: 0, HOST: 0}
        for r in self.running:
            on[self.apex_tier.get(r.request_id, HOST)] += 1
        mx = self.apex_stats["max_running"]
        for t in on:
            mx[t] = max(mx[t], on[t])
        st = self.apex_stats
        snap = (st["decisions"], st["promotions"], st["spills"], st["moves_waiting"],
                sum(st["waits"].values()), on[DEVICE], on[HOST])
        if snap != self._apex_last_written:
            self._apex_last_written = snap
            tiers.write_stats(self.apex_stats)
