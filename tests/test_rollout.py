"""Model rollout without restarts, step by step, on a real Triton and a real ``ner-gateway serve`` process: a version
loaded while the gateway runs serves pinned calls (one failing its checks is refused), shadow traffic scored entity
by entity, a canary's share, promotion, rollback and retirement under load with no failed call, and a bad policy
file that keeps the last good one.

The versions of ``tiny``: 1 and 2 have identical weights; 3's classifier head swaps PER and LOC (every PER entity
of version 1 is a LOC entity of version 3 with the same span, and the reverse). The real-server tests are the steps
of one rollout, in order, on one gateway: each starts where the previous one left off."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import tritonclient.grpc.aio as triton_grpc

from ner_gateway.core.admission import Admission, AdmissionLimits
from ner_gateway.core.domain import Document, Entity
from ner_gateway.core.ports import ServedModel
from ner_gateway.core.registry import ModelRegistry
from ner_gateway.core.rollout import RolloutPolicy
from ner_gateway.core.shadow import ShadowBudget, compare
from ner_gateway.net import free_port
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.triton.process import EmbeddedTriton

from conftest import TINY_MODEL, GatewayProcess, metric_sum, scrape, stop_process, wait_for

TEXTS = [
    "Angela Merkel visited Paris and Berlin with Emmanuel Macron",
    "Microsoft opened an office in Nairobi, Kenya, led by Satya Nadella",
    "The United Nations met in Geneva on Tuesday",
    "Lionel Messi left Barcelona for Paris Saint-Germain",
    "Tim Cook said Apple would build a campus in Austin, Texas",
    "nothing to see here",
]
SWAPPED = {"PER": "LOC", "LOC": "PER"}  # version 3's head
ROLES = {ner_pb2.VERSION_ROLE_STABLE: "stable", ner_pb2.VERSION_ROLE_CANARY: "canary",
         ner_pb2.VERSION_ROLE_SHADOW: "shadow", ner_pb2.VERSION_ROLE_PINNED: "pinned"}


# Pure parts first: the policy file's rules and the entity comparison.

def test_a_policy_reads_versions_as_strings_and_refuses_what_makes_no_sense() -> None:
    policy = RolloutPolicy.parse("models:\n  m:\n    stable: 3\n    canary: {version: 4, share: 0.1}\n")
    assert policy.of("m").stable == "3" and policy.of("m").canary is not None
    assert policy.of("m").canary.version == "4" and policy.of("other").stable is None
    assert RolloutPolicy.parse("") == RolloutPolicy()
    for bad, says in [("models: {m: {stable: 3, canary: {version: 3, share: 0.5}}}", "is the stable version"),
                      ("models: {m: {canary: {version: 4, share: 1.5}}}", "less than or equal to 1"),
                      ("models: {m: {shadow: {version: 4, share: 0}}}", "greater than 0"),
                      ("models: {m: {stable: v2}}", "should match pattern"),
                      ("models: {m: {stabel: 3}}", "Extra inputs are not permitted"),
                      ("models: [", "not YAML")]:
        with pytest.raises(ValueError, match=says):
            RolloutPolicy.parse(bad)


def test_entities_are_compared_by_span_then_label() -> None:
    def doc(*entities: tuple[str, int, int]) -> Document:
        return Document([Entity(label, start, end, "x", 0.9) for label, start, end in entities], 1)

    live = [doc(("PER", 0, 5), ("LOC", 10, 15), ("ORG", 20, 25)), doc(("PER", 0, 3)), doc()]
    candidate = [doc(("PER", 0, 5), ("PER", 10, 15), ("ORG", 20, 24)), doc(("PER", 0, 3)), doc(("LOC", 1, 2))]
    score = compare(live, candidate)
    assert score.entities == Counter({("PER", "agreed"): 2, ("LOC", "relabeled_from"): 1,
                                      ("PER", "relabeled_to"): 1, ("ORG", "dropped"): 1, ("ORG", "added"): 1,
                                      ("LOC", "added"): 1})
    assert (score.same_documents, score.changed_documents) == (1, 2)


def test_shadow_work_is_refused_first_its_budget_full_or_live_work_at_half_the_limits() -> None:
    admission = Admission(AdmissionLimits(max_requests=8, max_windows=100, retry_after_ms=0))
    budget = ShadowBudget(2, admission)
    assert budget.take() and budget.take() and not budget.take()  # its own budget: 2 at once
    budget.release()
    with admission.request(), admission.request(), admission.request(), admission.request():
        assert budget.take()  # live work at half the requests limit: still room
        budget.release()
        with admission.request():
            assert not budget.take()  # past half: shadow first refused, live calls still admitted
            with admission.request():
                pass
    with admission.windows_of(51):
        assert not budget.take()
    assert budget.take() and budget.running == 2


def test_calls_resolve_to_the_stable_version_and_candidates_take_over_only_when_nothing_else_is_ready() -> None:
    def version(number: str) -> SimpleNamespace:
        return SimpleNamespace(name="m", version=number, served=ServedModel("m", number, 8))

    v1, v2, v3 = version("1"), version("2"), version("3")
    down: set[str] = set()
    draws = iter([0.05, 0.5] * 100)
    registry = ModelRegistry([v1, v2, v3], ready=lambda served: served.version not in down, draw=lambda: next(draws))
    assert registry.get("m") is v3  # no policy: the highest
    registry.policy = RolloutPolicy.parse("models: {m: {stable: 1, canary: {version: 3, share: 0.1}}}")
    assert [registry.get("m") for _ in range(2)] == [v3, v1]  # the canary on a draw under its share
    assert registry.get("m", "2") is v2  # pinned: whatever the policy says
    down.add("3")
    assert [registry.get("m") for _ in range(2)] == [v1, v1]  # a canary not ready takes nothing
    down.clear()
    # A policy with a candidate and no stable: the highest version that is not a candidate, never the candidate.
    registry.policy = RolloutPolicy.parse("models: {m: {shadow: {version: 3, share: 1.0}}}")
    assert registry.get("m") is v2 and registry.shadow_for(v2) is v3 and registry.shadow_for(v1) is None
    assert registry.shadow_for(v3) is None
    # The stable not served (a typo) or not ready: the highest ready non-candidate; a candidate only as a last resort.
    registry.policy = RolloutPolicy.parse("models: {m: {stable: 7, canary: {version: 3, share: 0.1}}}")
    assert registry.unserved() == ["model m: version 7 not served (served: 1, 2, 3)"]
    assert registry.get("m") in (v2, v3) and registry.stable("m") is v2
    down.update({"1", "2"})
    assert registry.stable("m") is v3
    down.update({"3"})
    assert registry.stable("m") is v3  # nothing ready: the highest (calls fail UNAVAILABLE until one is back)
    assert [(v.model.version, v.role.value, v.share) for v in registry.listing("m")] == [
        ("1", "pinned", 0.0), ("2", "pinned", 0.0), ("3", "stable", 0.0)]


# On real servers.

@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path, Path]:
    """(repository, held): ``tiny`` built three times (versions 1, 2, 3); 2 and 3 wait in ``held`` until a test
    puts them into the repository, as ``ner-builder build`` would while the gateway runs."""
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    from ner_builder.build import BuildOptions, build_model
    from ner_builder.triton_config import ServingOptions

    swapped = tmp_path_factory.mktemp("swapped-checkpoint")
    model = BertForTokenClassification.from_pretrained(tiny_checkpoint)
    labels = model.config.id2label
    index = {label: i for i, label in labels.items()}
    order = [index[f"{tag[:2]}{SWAPPED.get(tag[2:], tag[2:])}"] if tag != "O" else i for i, tag in labels.items()]
    with torch.no_grad():  # output row i of version 3 is version 1's row of the swapped label
        model.classifier.weight.copy_(model.classifier.weight[order])
        model.classifier.bias.copy_(model.classifier.bias[order])
    model.save_pretrained(swapped)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(swapped)

    repository, held = tmp_path_factory.mktemp("rollout_repository"), tmp_path_factory.mktemp("held")
    options = BuildOptions(serving=ServingOptions(max_batch_size=8, keep_versions=4))
    for checkpoint in (tiny_checkpoint, tiny_checkpoint, swapped):
        build_model(checkpoint, repository, TINY_MODEL, options)
    for version in ("2", "3"):
        shutil.move(repository / TINY_MODEL / version, held / version)
    return repository, held


@pytest.fixture(scope="module")
async def triton(versions: tuple[Path, Path]):
    server = EmbeddedTriton(versions[0])
    await server.start()
    yield server
    await server.stop()


class Rollout:
    """The gateway under test, its Triton and its policy file, and the steps an operator takes."""

    def __init__(self, gateway: GatewayProcess, metrics_port: int, triton: EmbeddedTriton, repository: Path,
                 held: Path, policy: Path) -> None:
        self.gateway, self.metrics_port, self.triton = gateway, metrics_port, triton
        self.repository, self.held, self.policy = repository, held, policy
        self.channel = grpc.aio.insecure_channel(gateway.address)
        self.ner = ner_pb2_grpc.NerServiceStub(self.channel)

    def write_policy(self, text: str) -> None:
        """As a ConfigMap update does: the new file swapped in whole."""
        staged = self.policy.with_suffix(".new")
        staged.write_text(text)
        os.replace(staged, self.policy)

    async def load(self, *, add: str = "", remove: str = "") -> None:
        """Put version ``add`` into the repository (or move ``remove`` out), then have Triton load the model again:
        deploy/k8s/load-model.sh's step."""
        if add:
            shutil.move(self.held / add, self.repository / TINY_MODEL / add)
        if remove:
            shutil.move(self.repository / TINY_MODEL / remove, self.held / remove)
        control = triton_grpc.InferenceServerClient(self.triton.grpc_url)
        try:
            await control.load_model(TINY_MODEL, headers=self.triton.admin_headers)
        finally:
            await control.close()

    async def versions(self) -> dict[str, str]:
        """The served versions of ``tiny`` and their roles, as ListModels says."""
        models = (await self.ner.ListModels(ner_pb2.ListModelsRequest(), timeout=5)).models
        return {v.version: ROLES[v.role] for m in models if m.name == TINY_MODEL for v in m.versions}

    async def wait_versions(self, expected: dict[str, str], what: str) -> None:
        async def listed() -> bool:
            return await self.versions() == expected

        await wait_for(listed, 30, f"{what}: ListModels to show {expected}")

    async def recognize(self, texts: list[str], version: str = "") -> ner_pb2.RecognizeResponse:
        request = ner_pb2.RecognizeRequest(texts=texts, model=TINY_MODEL, model_version=version)
        return await self.ner.Recognize(request, timeout=20)

    def metrics(self) -> dict:
        return scrape(self.metrics_port)


@pytest.fixture(scope="module")
async def rollout(start_gateway, versions: tuple[Path, Path], triton: EmbeddedTriton, tmp_path_factory):
    repository, held = versions
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(f"models:\n  {TINY_MODEL}:\n    stable: '1'\n")
    metrics_port = free_port()
    gateway = await asyncio.to_thread(
        start_gateway, repository, "--triton-url", triton.grpc_url,
        # Room for every mirrored call of these tests' sequential callers (shadows outlast their live calls).
        env={"NER_ROLLOUT_POLICY_FILE": str(policy), "NER_METRICS_PORT": str(metrics_port),
             "NER_SHADOW_MAX_INFLIGHT": "64"})
    steps = Rollout(gateway, metrics_port, triton, repository, held, policy)
    yield steps
    await steps.channel.close()
    await asyncio.to_thread(stop_process, gateway.process)


def entities(response: ner_pb2.RecognizeResponse) -> list[list[tuple[str, int, int, str]]]:
    return [[(e.label, e.start, e.end, e.text) for e in d.entities] for d in response.documents]


async def test_a_version_loaded_in_triton_serves_pinned_calls_without_a_restart(rollout: Rollout) -> None:
    assert await rollout.versions() == {"1": "stable"}
    await rollout.load(add="2")
    await rollout.wait_versions({"1": "stable", "2": "pinned"}, "version 2 loaded")

    models = (await rollout.ner.ListModels(ner_pb2.ListModelsRequest(), timeout=5)).models
    assert [list(v.labels) for v in models[0].versions] == [list(models[0].labels)] * 2
    pinned, unpinned = await rollout.recognize(TEXTS, "2"), await rollout.recognize(TEXTS)
    assert (pinned.model_version, unpinned.model_version) == ("2", "1")
    assert entities(pinned) == entities(unpinned) and any(entities(unpinned))  # identical weights
    # The CLI pins it too.
    printed = await asyncio.to_thread(subprocess.run, [
        str(Path(sys.executable).parent / "ner-gateway"), "query", "--address", rollout.gateway.address,
        "--model", TINY_MODEL, "--model-version", "2", TEXTS[0]], capture_output=True, text=True, check=True)
    assert json.loads(printed.stdout)["model_version"] == "2"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rollout.recognize(TEXTS, "7")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == f"model '{TINY_MODEL}' has no version '7'; served: 1, 2"
    # Every answer is counted under the version that gave it.
    samples = rollout.metrics()
    assert metric_sum(samples, "ner_requests_total", version="2", code="OK") == 2  # gRPC and the CLI
    assert metric_sum(samples, "ner_requests_total", version="1", code="OK") == 1
    assert metric_sum(samples, "ner_model_versions", model=TINY_MODEL, version="2", role="pinned") == 1


async def test_a_version_that_fails_its_checks_is_refused_and_the_others_carry_on(rollout: Rollout,
                                                                                   start_gateway) -> None:
    broken = rollout.held / "4"
    shutil.copytree(rollout.repository / TINY_MODEL / "2", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "version": "4"}))
    with (broken / "tokenizer.json").open("a") as tokenizer:
        tokenizer.write(" ")  # no longer the tokenizer the manifest's checksum names
    await rollout.load(add="4")

    async def refused() -> bool:
        return metric_sum(rollout.metrics(), "ner_model_version_refusals_total", version="4") == 1

    await wait_for(refused, 30, "version 4 to be refused")
    assert "refusing model tiny version 4, READY in Triton" in rollout.gateway.output()
    assert await rollout.versions() == {"1": "stable", "2": "pinned"}
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rollout.recognize(TEXTS, "4")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await rollout.recognize(TEXTS)).model_version == "1"
    # A gateway that starts meanwhile (a new pod) serves the others too, and refuses 4 in the same way.
    metrics_port = free_port()
    other = await asyncio.to_thread(start_gateway, rollout.repository, "--triton-url", rollout.triton.grpc_url,
                                    env={"NER_METRICS_PORT": str(metrics_port)})
    try:
        assert "refusing model tiny version 4, READY in Triton" in other.output()
        assert metric_sum(scrape(metrics_port), "ner_model_version_refusals_total", version="4") == 1
    finally:
        await asyncio.to_thread(stop_process, other.process)
    # Refused once, not once per poll (the second gateway's start took many of the first one's polls).
    assert metric_sum(rollout.metrics(), "ner_model_version_refusals_total", version="4") == 1
    await rollout.load(remove="4")
    shutil.rmtree(rollout.held / "4")


async def shadow_scored(rollout: Rollout, live: str, candidate: str, calls: int) -> dict:
    pair = {"live_version": live, "candidate_version": candidate}

    def scored() -> bool:
        samples = rollout.metrics()
        assert metric_sum(samples, "ner_shadow_requests_total", outcome="refused", **pair) == 0
        return metric_sum(samples, "ner_shadow_requests_total", outcome="scored", **pair) == calls

    try:
        await wait_for(scored, 30, f"{calls} shadow calls scored")
    except AssertionError:
        shadow = {k: v for k, v in rollout.metrics().items() if k[0].startswith("ner_shadow")}
        raise AssertionError(f"{shadow}\n{rollout.gateway.output()[-3000:]}") from None
    return rollout.metrics()


def shadow_counts(samples: dict, live: str, candidate: str) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if (name == "ner_shadow_entities_total" and labels["live_version"] == live
                and labels["candidate_version"] == candidate and value):
            counts[(labels["label"], labels["outcome"])] += int(value)
    return counts


async def test_shadow_of_identical_weights_agrees_on_every_entity(rollout: Rollout) -> None:
    rollout.write_policy(f"models:\n  {TINY_MODEL}:\n    stable: '1'\n    shadow: {{version: '2', share: 1.0}}\n")
    await rollout.wait_versions({"1": "stable", "2": "shadow"}, "the shadow policy applied")
    for _ in range(3):  # pinned: answered, not mirrored (if they were, the counts below would be off)
        await rollout.recognize(TEXTS[:1], "1")
    answers = [await rollout.recognize([text]) for text in TEXTS * 3]
    # On a stream too: each message's answer is mirrored once it is written.
    requests = [ner_pb2.RecognizeRequest(texts=[text], model=TINY_MODEL) for text in TEXTS]
    answers += [answer async for answer in rollout.ner.RecognizeStream(iter(requests), timeout=20)]
    samples = await shadow_scored(rollout, "1", "2", len(answers))
    live = Counter(e[0] for answer in answers for document in entities(answer) for e in document)
    assert live and shadow_counts(samples, "1", "2") == Counter({(label, "agreed"): n for label, n in live.items()})
    pair = {"live_version": "1", "candidate_version": "2"}
    assert metric_sum(samples, "ner_shadow_documents_total", outcome="same", **pair) == len(answers)
    assert metric_sum(samples, "ner_shadow_documents_total", outcome="changed", **pair) == 0


async def test_shadow_of_a_relabeling_head_counts_exactly_the_relabels(rollout: Rollout) -> None:
    await rollout.load(add="3")
    rollout.write_policy(f"models:\n  {TINY_MODEL}:\n    stable: '1'\n    shadow: {{version: '3', share: 1.0}}\n")
    await rollout.wait_versions({"1": "stable", "2": "pinned", "3": "shadow"}, "version 3 shadowing")
    answers = [await rollout.recognize([text]) for text in TEXTS * 2]
    samples = await shadow_scored(rollout, "1", "3", len(answers))
    expected: Counter[tuple[str, str]] = Counter()
    changed = 0
    for answer in answers:
        labels = [e[0] for document in entities(answer) for e in document]
        changed += any(label in SWAPPED for label in labels)
        for label in labels:
            if label in SWAPPED:
                expected[(label, "relabeled_from")] += 1
                expected[(SWAPPED[label], "relabeled_to")] += 1
            else:
                expected[(label, "agreed")] += 1
    assert changed and shadow_counts(samples, "1", "3") == expected
    pair = {"live_version": "1", "candidate_version": "3"}
    assert metric_sum(samples, "ner_shadow_documents_total", outcome="changed", **pair) == changed
    # What the version says when asked directly: the same spans, PER and LOC swapped.
    direct = await rollout.recognize(TEXTS, "3")
    assert entities(direct) == [[(SWAPPED.get(label, label), start, end, text) for label, start, end, text in d]
                                for d in entities(await rollout.recognize(TEXTS))]


async def test_the_canary_answers_its_share_of_unpinned_calls(rollout: Rollout) -> None:
    rollout.write_policy(f"models:\n  {TINY_MODEL}:\n    stable: '1'\n    canary: {{version: '2', share: 0.25}}\n")
    await rollout.wait_versions({"1": "stable", "2": "canary", "3": "pinned"}, "the canary policy applied")
    calls = 400
    answered = Counter([(await rollout.recognize(TEXTS[:1])).model_version for _ in range(calls)])
    # Binomial(400, 0.25): mean 100, standard deviation 8.7; +-4 of them.
    assert set(answered) == {"1", "2"} and 65 <= answered["2"] <= 135, answered
    assert {(await rollout.recognize(TEXTS[:1], "1")).model_version for _ in range(20)} == {"1"}


async def test_a_bad_policy_file_keeps_the_last_good_one(rollout: Rollout) -> None:
    def reads(outcome: str) -> float:
        return metric_sum(rollout.metrics(), "ner_rollout_policy_reloads_total", outcome=outcome)

    invalid, applied = reads("invalid"), reads("applied")
    # Valid YAML whose stable would change everything, with one value out of bounds: none of it applies.
    rollout.write_policy(f"models:\n  {TINY_MODEL}:\n    stable: '3'\n    canary: {{version: '2', share: 7}}\n")
    await wait_for(lambda: reads("invalid") == invalid + 1, 30, "the bad policy to be refused")
    assert "not applied, the last good one stays" in rollout.gateway.output()
    assert await rollout.versions() == {"1": "stable", "2": "canary", "3": "pinned"}
    # A file that goes away (a ConfigMap deleted): the same, said once.
    rollout.policy.unlink()
    await wait_for(lambda: reads("invalid") == invalid + 2, 30, "the missing policy to be refused")
    rollout.write_policy(f"models:\n  {TINY_MODEL}:\n    stable: '1'\n")
    await rollout.wait_versions({"1": "stable", "2": "pinned", "3": "pinned"}, "the policy back")
    assert reads("invalid") == invalid + 2 and reads("applied") == applied + 1


async def under_load(rollout: Rollout, steps, clients: int = 8) -> Counter[str]:
    """Run ``steps`` (a coroutine) while ``clients`` callers send unpinned calls back to back; the answers' versions
    and every failure's code, counted."""
    outcomes: Counter[str] = Counter()
    done = asyncio.Event()

    async def caller(index: int) -> None:
        while not done.is_set():
            try:
                outcomes[(await rollout.recognize([TEXTS[index % len(TEXTS)]])).model_version] += 1
            except grpc.aio.AioRpcError as e:
                outcomes[e.code().name] += 1

    callers = [asyncio.create_task(caller(i)) for i in range(clients)]
    try:
        await steps()
    finally:
        done.set()
        await asyncio.gather(*callers)
    return outcomes


async def answers_from(rollout: Rollout, version: str) -> None:
    async def answered() -> bool:
        return (await rollout.recognize(TEXTS[:1])).model_version == version

    await wait_for(answered, 30, f"unpinned calls answered by version {version}")


async def test_loading_promotion_rollback_and_retirement_under_load_fail_no_call(rollout: Rollout) -> None:
    await rollout.load(remove="3")
    await rollout.wait_versions({"1": "stable", "2": "pinned"}, "version 3 gone")

    async def steps() -> None:
        await rollout.load(add="3")  # a new version appears: pinned only, nothing changes for these callers
        await rollout.wait_versions({"1": "stable", "2": "pinned", "3": "pinned"}, "version 3 loaded")
        await rollout.load(remove="3")
        await rollout.wait_versions({"1": "stable", "2": "pinned"}, "version 3 unloaded")
        rollout.write_policy(f"models:\n  {TINY_MODEL}:\n    stable: '2'\n")  # promote
        await answers_from(rollout, "2")
        rollout.write_policy(f"models:\n  {TINY_MODEL}:\n    stable: '1'\n")  # roll back
        await answers_from(rollout, "1")
        await rollout.load(remove="1")  # retire the stable version itself: Triton unloads it mid-load
        await answers_from(rollout, "2")
        await rollout.wait_versions({"2": "stable"}, "version 1 retired")

    outcomes = await under_load(rollout, steps)
    assert set(outcomes) == {"1", "2"} and outcomes["1"] > 50 and outcomes["2"] > 50, outcomes
