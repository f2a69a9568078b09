"""`lanner profile`: component times add up to the step, FLOP counts are right, outputs are written."""
import csv
import json

import pytest
import torch

from lanner.config import ModelConfig
from lanner.profiling.flops import Cost, component_costs, step_cost
from lanner.profiling.machine import Machine

TINY = ModelConfig(architecture="LlamaForCausalLM", hidden_size=8, intermediate_size=16, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=2, vocab_size=32, rms_norm_eps=1e-5, rope_theta=1e4,
                   max_position_embeddings=64, tie_word_embeddings=True, attention_bias=False)


def test_prefill_flops_and_bytes_equal_a_hand_computation():
    # H=8, I=16, L=2 layers, Hq=4, Hkv=2, D=2, V=32, 2-byte dtype; 2 prompts of 3 tokens: T = 6 rows.
    c = component_costs(TINY, "prefill", batch=2, context=3, dtype_bytes=2)
    # QKV: [6, 8] @ [8, (4 + 2 + 2) * 2 = 16]: 2*6*8*16 = 1536 FLOPs; weight 128 + in 48 + out 96 elements.
    assert c["qkv_proj"] == Cost(2 * 1536, 2 * 2 * (128 + 48 + 96))
    # O: [6, 8] @ [8, 8]: 2*6*8*8 = 768; 64 + 48 + 48 elements.
    assert c["o_proj"] == Cost(2 * 768, 2 * 2 * (64 + 48 + 48))
    # gate/up: [6, 8] @ [8, 32]: 3072; 256 + 48 + 192.  down: [6, 16] @ [16, 8]: 1536; 128 + 96 + 48.
    assert c["gate_up_proj"] == Cost(2 * 3072, 2 * 2 * (256 + 48 + 192))
    assert c["down_proj"] == Cost(2 * 1536, 2 * 2 * (128 + 96 + 48))
    # silu(gate) * up over 6 x 16 elements: 5 FLOPs each; reads gate and up, writes the product.
    assert c["mlp_act"] == Cost(2 * 5 * 96, 2 * 3 * 96 * 2)
    # Causal attention, per sequence and layer: 3*4/2 = 6 (query, key) pairs, QK^T and PV each 2*Hq*D per pair
    # = 4*4*2*6 = 192 FLOPs; moves q and out (3 rows x 4 heads x 2) and K, V (3 keys x 2 heads x 2), 2 bytes each.
    assert c["attention"] == Cost(2 * 2 * 192, 2 * 2 * 2 * (2 * 3 * 4 * 2 + 2 * 3 * 2 * 2))
    # Rotary on q and k: 6 rows x (4 + 2) heads x 2 = 72 elements, 3 FLOPs each; read + write them, plus the
    # fp32 cos/sin row (D = 2 floats) of each of the 6 rows.
    assert c["rotary"] == Cost(2 * 3 * 72, 2 * (2 * 72 * 2 + 6 * 2 * 4))
    # 2 L + 1 = 5 fused add + RMSNorms over 6 x 8 elements: 5 FLOPs and 4 element moves each.
    assert c["norms"] == Cost(5 * 5 * 48, 5 * 4 * 48 * 2)
    # KV write: read k and v (6 rows x 2 heads x 2 elements each) and write them to the cache: 4 moves a layer.
    assert c["kv_store"] == Cost(0, 2 * 4 * (6 * 2 * 2) * 2)
    assert c["embedding"] == Cost(0, 2 * 6 * 8 * 2)
    # LM head for one row per sequence: [2, 8] @ [8, 32] = 1024 FLOPs; 256 + 16 + 64 elements.
    assert c["lm_head"] == Cost(1024, 2 * (256 + 16 + 64))
    assert c["sampling"] == Cost(0, 4 * 2 * 32)
    total = step_cost(TINY, "prefill", 2, 3, 2)
    assert total.flops == 3072 + 1536 + 6144 + 3072 + 960 + 768 + 432 + 1200 + 1024


def test_decode_flops_and_bytes_equal_a_hand_computation():
    # 2 sequences with 5 cached tokens each decode one token: T = 2 rows, each attends to 6 keys.
    c = component_costs(TINY, "decode", batch=2, context=5, dtype_bytes=2)
    assert c["qkv_proj"] == Cost(2 * (2 * 2 * 8 * 16), 2 * 2 * (128 + 16 + 32))
    assert c["gate_up_proj"] == Cost(2 * (2 * 2 * 8 * 32), 2 * 2 * (256 + 16 + 64))
    # Per sequence and layer: 6 keys, 4*Hq*D*6 = 192 FLOPs; moves q, out (1 x 4 x 2 each), K, V (6 x 2 x 2 each).
    assert c["attention"] == Cost(2 * 2 * 192, 2 * 2 * 2 * (2 * 1 * 4 * 2 + 2 * 6 * 2 * 2))
    assert c["lm_head"] == Cost(1024, 2 * (256 + 16 + 64))
    assert c["attention"].intensity == pytest.approx(192 / 128)
    with pytest.raises(ValueError, match="phase"):
        component_costs(TINY, "verify", 1, 1)


# ---- a real profile on the default model --------------------------------------------------------------
CASES = [("prefill", 1, 64), ("prefill", 2, 32), ("decode", 1, 64), ("decode", 4, 128)]


@pytest.fixture(scope="module")
def profiled(default_model_path):
    from lanner.engine.engine import LLMEngine
    from lanner.profiling.machine import measure_machine
    from lanner.profiling.profile import Case, Profiler, describe_engine, engine_config_for, resolve_backend
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # on a shared 2-core box one thread is the steadiest clock
    try:
        cases = [Case(*c) for c in CASES]
        engine = LLMEngine(engine_config_for(cases, model=default_model_path, dtype="auto",
                                             attention_backend=resolve_backend("auto", "cpu")))
        results = Profiler(engine, repeats=15, warmup=1).run(cases)   # shared boxes: more runs, steadier middle half
        machine = measure_machine(engine.runner.dtype, "cpu", matmul_n=512, copy_mib=32, repeats=3)
        yield engine, results, machine, describe_engine(engine)
    finally:
        torch.set_num_threads(threads)


def test_component_times_add_up_to_an_independently_timed_step(profiled):
    from lanner.profiling.timing import COMPONENTS
    _, results, _, _ = profiled
    for r in results:
        assert set(r.components_ms) == set(COMPONENTS), f"{r.phase} B={r.batch} C={r.context}"
        assert all(ms >= 0 for ms in r.components_ms.values())
        assert r.measured_ms == pytest.approx(r.instrumented_ms)   # exclusive times cover the step exactly
        assert abs(r.coverage - 1) < 0.10, \
            f"{r.phase} B={r.batch} C={r.context}: components {r.measured_ms:.1f} ms vs step {r.step_ms:.1f} ms"
        # the shares as reported: model components + sampling + engine overhead = the plain step
        assert r.model_ms + r.components_ms["sampling"] + r.overhead_ms == pytest.approx(r.step_ms)


def test_a_one_call_decode_step_is_timed_by_part(profiled):
    """A decode step the model runs in one C call (DecodeStep) is timed inside it, part by part (decode_layers'
    timings): attention and the linears show as themselves, not as one opaque call in the model's glue."""
    engine, results, _, _ = profiled
    step = engine.runner.model.decode_step
    assert type(step).__name__ == "DecodeStep" and step.timings is None   # the timed wrapper is gone
    timed = [r for r in results if r.phase == "decode" and step.takes(r.batch, engine.runner.dtype)]
    assert timed
    for r in timed:
        parts = r.components_ms
        assert min(parts["attention"], parts["qkv_proj"], parts["o_proj"], parts["down_proj"], parts["norms"]) > 0
        assert parts["model_glue"] < 0.25 * r.measured_ms, f"decode B={r.batch}: {parts}"


def test_instrumentation_is_undone_and_the_engine_left_idle(profiled):
    engine, _, _, _ = profiled
    model = engine.runner.model
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert type(engine.sampler).__name__ == "Sampler" and "schedule" not in vars(engine.scheduler)
    assert all("forward" not in vars(m) for m in model.modules())
    assert all(layer.self_attn.backend is engine.runner.backend for layer in model.layers)


def test_outputs_table_csv_json_and_plots_are_written(profiled, tmp_path):
    from lanner.profiling import report
    _, results, machine, meta = profiled
    paths = report.write_outputs(results, machine, str(tmp_path), meta)
    for kind in ("breakdown", "roofline"):
        with open(paths[kind], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["components"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r.components_ms) for r in results)
    assert {row["bound"] for row in rows if row["component"] == "gate_up_proj"} <= {"compute", "memory"}
    with open(paths["cases"]) as f:
        cases = list(csv.DictReader(f))
    assert [(c["phase"], int(c["batch"]), int(c["context"])) for c in cases] == CASES
    for c in cases:   # group shares of the plain step add up to it
        assert sum(float(v) for k, v in c.items() if k.startswith("share_")) == pytest.approx(1, abs=1e-3)
    loaded, loaded_machine, loaded_meta = report.load_results(paths["json"])
    assert loaded_machine == machine and loaded_meta == json.loads(json.dumps(meta))
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in results]
    text = report.table(results, machine)
    assert len(text.splitlines()) == 2 + len(results) + 1 and "GFLOP/s" in text


def test_cli_profile_command_replots_a_saved_profile(profiled, tmp_path, capsys):
    from lanner import cli
    from lanner.profiling import report
    _, results, machine, meta = profiled
    saved = report.write_outputs(results, machine, str(tmp_path / "first"), meta, plots=False)
    args = cli.build_parser().parse_args(["profile", "--batch-sizes", "1,4", "--context-lengths", "64,256"])
    assert args.batch_sizes == [1, 4] and args.context_lengths == [64, 256]
    assert cli.main(["profile", "--replot", saved["json"], "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "roofline.png").exists() and (tmp_path / "again" / "breakdown.png").exists()
    assert "decode" in capsys.readouterr().out


def test_roofline_ceilings_classify_by_the_ridge_point():
    m = Machine("cpu", "bfloat16", 2, peak_gflops=100.0, peak_gbs=10.0)
    assert m.ridge == 10.0
    assert (m.roof(1.0), m.roof(50.0)) == (10.0, 100.0)
    assert (m.bound(9.9), m.bound(10.0)) == ("memory", "compute")
