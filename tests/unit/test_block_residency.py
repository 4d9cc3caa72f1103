"""One block resident at a time: the meta-built block, early-stopped captures, host activations, the
calibrator's host-memory activations, device settings of the services, and tracing without OpenTelemetry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from bitsmith.calib import capture_hessians, forward_block
from bitsmith.calib.capture import run_with_input_hooks
from bitsmith.devices import MatmulPrecision, resolve_device
from bitsmith.errors import ConfigError, FormatError, NotFoundError
from bitsmith.models import load_checkpoint
from bitsmith.store import ArtifactStore
from bitsmith_services.calibrator.activations import HOST_HANDLE, KEPT_PER_STREAM, HeldActivations
from bitsmith_services.registry import Activations, Role, ServiceOptions


def random_llama(out: Path, *, layers: int = 2, hidden: int = 128, ffn: int = 256, vocab: int = 1000) -> Path:
    """A random-weight Llama checkpoint written by transformers itself."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_llama(tmp_path_factory.mktemp("llama") / "m")


def test_block_forward_is_transformers_layer_on_checkpoint_weights(model_dir: Path) -> None:
    import transformers

    model = load_checkpoint(model_dir)
    reference = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = reference(ids, output_hidden_states=True).hidden_states
    hidden = model.embed(ids)
    for bid in range(model.num_blocks):
        hidden = forward_block(model, bid, hidden)
        if bid < model.num_blocks - 1:
            torch.testing.assert_close(hidden, states[bid + 1], rtol=1e-5, atol=1e-5)
    layer = model.block_module(0)
    assert not any(t.is_meta for t in [*layer.parameters(), *layer.buffers()])


def test_bfloat16_blocks_are_transformers_bfloat16_layers_and_keep_bfloat16_activations(model_dir: Path) -> None:
    """`compute_dtype=bfloat16` runs each block as the bfloat16 model would (weights, activations and the
    quantized overrides in bfloat16), returns bfloat16 activations, and its Hessians stay within bfloat16's
    rounding of the float32 blocks'."""
    import transformers

    reference = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = reference(ids, output_hidden_states=True).hidden_states
    exact, model = load_checkpoint(model_dir), load_checkpoint(model_dir, compute_dtype=torch.bfloat16)
    hidden = model.embed(ids)
    out = forward_block(model, 0, hidden)
    assert out.dtype is torch.bfloat16
    torch.testing.assert_close(out, states[1])
    weight = model.linear_weight(0, "mlp.up_proj")
    halved = {"mlp.up_proj.weight": weight / 2}
    assert not torch.equal(forward_block(model, 0, hidden, halved), out)
    names = ["self_attn.q_proj", "mlp.down_proj"]
    fast, slow = capture_hessians(model, 0, hidden, names), capture_hessians(exact, 0, hidden, names)
    for name in names:
        h, h32 = fast[name].hessian, slow[name].hessian
        assert h.dtype is torch.float32 and not torch.equal(h, h32)
        assert float((h - h32).norm() / h32.norm()) < 2e-2
    with pytest.raises(ConfigError, match="float32 or bfloat16"):
        load_checkpoint(model_dir, compute_dtype=torch.float16)


def test_embedding_and_block_outputs_stay_on_the_inputs_device(model_dir: Path) -> None:
    model = load_checkpoint(model_dir)
    hidden = model.embed(torch.zeros(3, 8, dtype=torch.long))
    out = forward_block(model, 0, hidden, chunk=2)
    assert hidden.device.type == out.device.type == "cpu" and out.shape == hidden.shape
    torch.testing.assert_close(out, forward_block(model, 0, hidden, chunk=3))


def test_capture_stops_the_forward_once_every_hooked_linear_ran(model_dir: Path) -> None:
    model = load_checkpoint(model_dir)
    hidden = model.embed(torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(2)))
    calls: list[str] = []
    handle = model.block_module(0).get_submodule("mlp.down_proj").register_forward_pre_hook(
        lambda *_: calls.append("down"))
    try:
        capture_hessians(model, 0, hidden, ["self_attn.q_proj"], chunk=2)
        assert calls == []  # the MLP never ran
        early = capture_hessians(model, 0, hidden, ["mlp.down_proj"], chunk=2)
        assert calls == ["down", "down"]
    finally:
        handle.remove()
    # The same statistic as a full forward with a plain hook.
    rows: list[torch.Tensor] = []
    layer = model.block_module(0)
    h = layer.get_submodule("mlp.down_proj").register_forward_pre_hook(lambda _m, a: rows.append(a[0]))
    try:
        forward_block(model, 0, hidden, chunk=2)
    finally:
        h.remove()
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
    torch.testing.assert_close(early["mlp.down_proj"][0], (2 * x.T @ x / x.shape[0]).float(), rtol=1e-5, atol=1e-6)


def test_a_hooked_linear_the_forward_never_reaches_is_an_error(model_dir: Path) -> None:
    model = load_checkpoint(model_dir)
    hidden = model.embed(torch.zeros(1, 4, dtype=torch.long))
    layer = model.block_module(0)
    original = layer.mlp.forward
    layer.mlp.forward = lambda x: x  # type: ignore[method-assign]  # an MLP that skips its linears
    try:
        with pytest.raises(Exception, match=r"did not run"):
            run_with_input_hooks(model, 0, hidden, {"mlp.down_proj": lambda *_: None})
    finally:
        layer.mlp.forward = original  # type: ignore[method-assign]


def test_a_host_reference_names_one_tensor_and_never_resolves_from_the_store(tmp_path: Path) -> None:
    store, host = ArtifactStore(tmp_path), HeldActivations()
    key = "jobs/j/inputs-1.safetensors"
    first = host.put("j", key, "hidden", torch.zeros(2, 2))
    assert first.sha256.startswith(HOST_HANDLE)
    store.put_tensors(key, {"hidden": torch.zeros(2, 2)})  # the same key and bytes, written by someone else
    again = host.put("j", key, "hidden", torch.ones(2, 2))  # a retried Advance replaces the tensor
    assert again != first and host.get("j", again, store)[0, 0] == 1
    with pytest.raises(FormatError, match="sha256"):  # the old reference names the replaced tensor only
        host.get("j", first, store)


def test_host_activations_keep_the_latest_two_per_job_and_stream(tmp_path: Path) -> None:
    """The float model's stream (asymmetric calibration) is kept beside the quantized one: neither's
    puts evict the other's tensors."""
    store, host = ArtifactStore(tmp_path), HeldActivations()
    refs, floats = [], []
    for i in range(KEPT_PER_STREAM + 1):
        refs.append(host.put("j", f"jobs/j/inputs-{i}.safetensors", "hidden", torch.full((2, 2), float(i))))
        floats.append(host.put("j", f"jobs/j/reference-{i}.safetensors", "hidden", torch.full((2, 2), -float(i)),
                               stream="reference"))
    assert host.get("j", refs[-1], store)[0, 0] == KEPT_PER_STREAM
    assert host.get("j", refs[-2], store)[0, 0] == KEPT_PER_STREAM - 1
    assert host.get("j", floats[-2], store)[0, 0] == 1 - KEPT_PER_STREAM
    assert not (tmp_path / "jobs").exists()  # nothing was written
    for dropped in (refs[0], floats[0]):
        with pytest.raises(NotFoundError, match="neither held by this calibrator"):
            host.get("j", dropped, store)
    host.release("j")
    with pytest.raises(NotFoundError):
        host.get("j", refs[-1], store)


def test_device_settings_go_only_to_the_roles_that_compute() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    options = ServiceOptions(device="cpu", activations=Activations.HOST, matmul_precision=MatmulPrecision.HIGHEST)
    assert options.server_kwargs(Role.CALIBRATOR) == {"device": "cpu", "activations": Activations.HOST,
                                                      "matmul_precision": MatmulPrecision.HIGHEST}
    assert options.server_kwargs(Role.SOLVER) == {"device": "cpu"}
    with pytest.raises(ConfigError, match="takes no matmul precision"):
        ServiceOptions(matmul_precision=MatmulPrecision.HIGHEST).check(Role.SOLVER)
    with pytest.raises(ConfigError, match="takes no device"):
        ServiceOptions(device="cpu").check(Role.PACKER)
    with pytest.raises(ConfigError, match="keeps no activations"):
        ServiceOptions(activations=Activations.HOST).check(Role.SOLVER)


def test_one_set_of_options_starts_every_role_of_a_stack(tmp_path: Path) -> None:
    """A coordinator that starts its workers hands each role what it takes of one `ServiceOptions`; workers
    someone else started at given addresses cannot be told how to compute, so options there are refused."""
    from bitsmith_services.coordinator.placement import ServiceAddresses
    from bitsmith_services.stack import LocalStack

    options = ServiceOptions(device="cpu", activations=Activations.HOST, matmul_precision=MatmulPrecision.BFLOAT16)
    for role in Role:
        options.for_role(role).check(role)
    assert options.for_role(Role.CALIBRATOR) == options
    assert options.for_role(Role.SOLVER) == ServiceOptions(device="cpu")
    assert options.for_role(Role.PACKER) == ServiceOptions()
    addresses = ServiceAddresses(dict.fromkeys(Role, "127.0.0.1:9"))
    with pytest.raises(ConfigError, match="compute as they were started"):
        LocalStack(home=tmp_path, services=addresses, options=options).start()
    assert not (tmp_path / "jobs.sqlite").exists()


def test_services_run_untraced_without_opentelemetry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bitsmith.telemetry import current_trace_id, setup_tracing, tracing_available
    from bitsmith_services.registry import start_service
    from bitsmith_services.stack import wait_until_serving

    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith("opentelemetry.")] or ["opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)  # blocked, also where an earlier test imported it
    assert not tracing_available()
    assert current_trace_id() == ""
    with setup_tracing("bitsmith-untraced-test").get_tracer("t").start_as_current_span("job"):
        pass
    server, port = start_service(Role.SOLVER, "127.0.0.1:0", tmp_path, options=ServiceOptions(device="cpu"))
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout=10)
    finally:
        server.stop(grace=0).wait()


def test_an_advance_drops_what_its_stream_held_from_before_its_inputs(tmp_path: Path) -> None:
    """Once an Advance has block b's inputs, block b-1's are never read again: dropping them before the
    outputs are made keeps two sets per stream in memory, not three. The other stream is left alone."""
    store, held = ArtifactStore(tmp_path), HeldActivations()
    older = held.put("j", "jobs/j/inputs-0.safetensors", "hidden", torch.zeros(2, 2))
    current = held.put("j", "jobs/j/inputs-1.safetensors", "hidden", torch.ones(2, 2))
    other = held.put("j", "jobs/j/reference-0.safetensors", "hidden", torch.ones(2, 2), stream="reference")
    held.drop_older("j", current)
    with pytest.raises(NotFoundError, match="neither held by this calibrator"):
        held.get("j", older, store)
    assert held.get("j", current, store)[0, 0] == 1 and held.get("j", other, store)[0, 0] == 1
    held.drop_older("j", current)  # again, or with nothing older: a no-op
    assert held.get("j", current, store)[0, 0] == 1
