"""benchmarks.memory_plan: its HLO accounting, its linear fit and its largest batch per chip, and
a plan for a tiny DiT whose state per device is the arithmetic (params x 4 bytes x 4 copies / N).
"""
import subprocess
import sys

import pytest

from benchmarks import memory_plan as mp
from conftest import ROOT
from test_benchmarks import BLOCK_TF_STACK

GIB = 2**30
TINY = dict(depth=1, hidden_size=64, num_heads=2, num_classes=10)

# A compiled module's shape: the entry runs a loop 28 times whose body gathers a weight and calls
# a computation that reduces a gradient; one gather outside the loop; an async pair counted once.
HLO = """HloModule jit_train_step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  ROOT %sum = f32[] add(%a, %b)
}

%inner (p: f32[64,32]) -> f32[64,32] {
  %p = f32[64,32]{1,0} parameter(0)
  ROOT %all-reduce.1 = f32[64,32]{1,0} all-reduce(%p), replica_groups={}, to_apply=%add
}

%body (t: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %t = (s32[], bf16[8,16]) parameter(0)
  %all-gather.2 = bf16[8,128]{1,0} all-gather(%x), dimensions={1}
  %call.3 = f32[64,32]{1,0} call(%y), to_apply=%inner
  ROOT %tuple = (s32[], bf16[8,16]) tuple(%i, %x)
}

%cond (t: (s32[], bf16[8,16])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[] {
  %a = f32[4]{0} parameter(0)
  %all-gather.9 = f32[4,1024]{1,0} all-gather(%a), dimensions={1}
  %ags = (f32[16]{0}, f32[256]{0}) all-gather-start(%a), dimensions={0}
  %agd = f32[256]{0} all-gather-done(%ags)
  %while.4 = (s32[], bf16[8,16]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"28"}}
  ROOT %r = f32[] reduce(%a, %z), to_apply=%add
}
"""


def test_collectives_count_every_iteration_of_the_loops_around_them():
  totals = mp.collectives_per_step(HLO)
  assert totals["all-gather"] == {"count": 28 + 1 + 1, "bytes": 28 * 8 * 128 * 2 + 4 * 1024 * 4
                                  + 256 * 4, "largest": 4 * 1024 * 4}
  assert totals["all-reduce"] == {"count": 28, "bytes": 28 * 64 * 32 * 4, "largest": 64 * 32 * 4}
  assert totals["reduce-scatter"]["count"] == 0


def test_two_batches_give_the_line_and_the_largest_batch_per_chip():
  def compiled(batch):  # 1 GiB of state, 0.5 GiB fixed temporaries, 0.25 GiB per image
    return {"batch": batch, "args": GIB + batch * 2**20, "temp": GIB // 2 + batch * (GIB // 4),
            "out": GIB, "alias": GIB}

  line = mp.fit(compiled(2), compiled(4))
  assert line["per_image"] == GIB // 4 + 2**20
  assert line["fixed"] == GIB + GIB // 2
  assert line["temp_per_image"] == GIB // 4 and line["temp_fixed"] == GIB // 2
  # 16 GiB: (16 - 1.5) / (0.25 + 1/1024) = 57.8; 1 GiB holds not even the state.
  assert mp.max_batch(line, 16) == 57 and mp.max_batch(line, 1) == 0


@pytest.fixture(scope="module")
def tiny_plan():
  # 4 fake devices: data parallel and FSDP, per-device batches 2 and 4, then 16 for the check
  # (every chip holds more than 16 images of this model).
  return mp.plan("S/2", TINY, [32], [4], ["dp", "fsdp"], [None], (2, 4), max_checked=16)


@pytest.mark.slow
def test_state_per_device_is_params_times_16_bytes_over_the_sharding_devices(tiny_plan):
  dp, fsdp = tiny_plan
  assert (dp["mesh"], fsdp["mesh"]) == ([4, 1, 1], [1, 4, 1])
  params = dp["params"]
  assert params == 107_488  # the tiny DiT: one block of width 64 and its embedders
  assert dp["state"] == pytest.approx(mp.state_arithmetic(params, 1), rel=0.10)
  assert fsdp["state"] == pytest.approx(mp.state_arithmetic(params, 4), rel=0.10)


@pytest.mark.slow
def test_tiny_plan_is_linear_in_the_batch_and_reports_its_collectives(tiny_plan):
  dp, fsdp = tiny_plan
  for row in tiny_plan:
    assert row["linearity"]["batch"] == row["max_checked"] == 16
    at = row["measured"]  # peak bytes per device at per-device batches 2, 4 and 16
    assert sorted(at) == [2, 4, 16] and at[2] < at[4] < at[16]
    # The plan's line is the chord from batch 2 to the checked 16 ...
    assert row["fixed"] + 2 * row["per_image"] == pytest.approx(at[2])
    assert row["fixed"] + 16 * row["per_image"] == pytest.approx(at[16])
    # ... and the line through 2 and 4 is off at 16 by what `linearity` says.
    line = at[2] + (at[4] - at[2]) / 2 * 14
    assert row["linearity"]["error"] == pytest.approx(line / at[16] - 1)
    assert row["max_batch"]["TPU v5e"] == mp.max_batch(row, 16) > 16
    assert row["max_batch"]["TPU v5e"] < row["max_batch"]["TPU v4"] < row["max_batch"]["H100"]
  # Data parallel reduces the gradients and gathers nothing; FSDP gathers every weight.
  assert dp["collectives"]["all-gather"]["count"] == 0
  assert dp["collectives"]["all-reduce"]["bytes"] >= dp["params"] * 4
  assert fsdp["collectives"]["all-gather"]["bytes"] >= fsdp["params"] * 4
  table = mp.format_tables(tiny_plan)
  assert "| 32 px | (1, 4, 1) | 4 | none | >16 | >16 | >16 | >16 | >16 | 16 (" in table, table


BLOCKED = BLOCK_TF_STACK + """
from benchmarks import memory_plan
r = memory_plan.compile_job(dict(variant="S/2", overrides=%r, image_size=32, mesh=[1, 1, 1],
                                 batch=2, remat="nothing_saveable"))
print(r["params"], r["args"] > 0, r["temp"] > 0)
"""


def test_memory_plan_needs_only_jax_flax_optax_numpy():
  # The suite's XLA_FLAGS (conftest.TEST_XLA_FLAGS) are inherited: backend optimizations off, as
  # memory_plan.run_jobs compiles its jobs.
  result = subprocess.run([sys.executable, "-c", BLOCKED % (TINY,)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["107488", "True", "True"]
