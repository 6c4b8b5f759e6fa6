"""Custom criteria (own rubric, integer scale, threshold) and panels of LLM judges, through the
real OpenAI and Anthropic SDKs against the local fake of their APIs (tests/judge/fake_llm.py,
scores scripted per model): verdicts on a custom scale, out-of-scale scores unscored, each
member's verdict and the combined one (mean, majority, too few scored), the budget shared by
the members, the cost estimate, the config errors with their exact field paths, and existing
configs unchanged (request shape, prompt version, cache key)."""

import hashlib
import json
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.convert import dict_to_struct
from services.common.errors import InvalidArgument
from services.judge.config import JudgeSettings, validate_judge_config
from services.judge.llm import cost
from services.judge.llm.cache import cache_key
from services.judge.llm.errors import LlmJudgingFailed
from services.judge.llm.judge import LlmJudge
from services.judge.llm.settings import LlmSettings, ModelPrice
from services.judge.models import run_llm_state_table
from services.judge.schema import Item, LlmJudgeConfig
from services.judge.server import start
from tests.helpers import create_run, field_violations, rich_status
from tests.judge.fake_llm import FakeLlmServer, malformed, server_error
from tests.judge.test_llm import pg_db  # noqa: F401 - the fixture, used by judge_for
from tests.judge.test_service import ALICE, Judge, enqueue_request, tasks_done

USER = "panel-user"
GPT, CLAUDE, LOCAL = "gpt-panel", "claude-panel", "local-panel"
# 500 input tokens at $2/Mtok + 100 output tokens at $10/Mtok = $0.002 per call (fake usage).
PRICE = ModelPrice(input_per_mtok=2.0, output_per_mtok=10.0)
CALL_COST = 0.002
SCORED, UNSCORED = judge_pb2.JUDGMENT_STATUS_SCORED, judge_pb2.JUDGMENT_STATUS_UNSCORED
PANEL = [{"provider": "openai", "model": GPT}, {"provider": "anthropic", "model": CLAUDE},
         {"provider": "openai_compatible", "model": LOCAL, "endpoint": "local"}]
MEMBERS = [f"openai/{GPT}", f"anthropic/{CLAUDE}", f"openai_compatible/{LOCAL}"]
TONE = {"name": "tone", "rubric": "Is the response polite? 5: very; 1: rude.",
        "scale_min": 1, "scale_max": 5, "threshold": 4}
# accuracy (threshold 7): 8 pass, 6 fail, 7 pass -> mean 7 (pass), majority 2 of 3 (pass).
# tone (1..5, threshold 4): 5 pass, 4 pass, 2 fail -> mean 11/3 (fail), majority 2 of 3 (pass).
MODEL_SCORES = {GPT: {"accuracy": 8, "tone": 5}, CLAUDE: {"accuracy": 6, "tone": 4},
                LOCAL: {"accuracy": 7, "tone": 2}}
COMBINED = {"mean": {"accuracy": (7.0, True), "tone": (11 / 3, False)},
            "majority": {"accuracy": (7.0, True), "tone": (11 / 3, True)}}


@pytest.fixture
def fake() -> Iterator[FakeLlmServer]:
    server = FakeLlmServer(model_scores=MODEL_SCORES).start()
    yield server
    server.stop()


def llm_values(fake: FakeLlmServer, **overrides: Any) -> dict[str, Any]:
    """LLM settings: both paid APIs and endpoint "local" on the fake server."""
    return {"openai_api_key": "test-openai-key", "anthropic_api_key": "test-anthropic-key",
            "openai_base_url": fake.openai_url, "anthropic_base_url": fake.anthropic_url,
            "llm_endpoints": {"local": {"base_url": fake.openai_url}},
            "llm_prices": {GPT: PRICE, CLAUDE: PRICE}, "llm_backoff_base_s": 0.01,
            "llm_backoff_max_s": 0.05, "llm_request_timeout_s": 5.0,
            "llm_default_budget_usd": 100.0, **overrides}


@pytest.fixture
async def judge_for(pg_db, fake) -> AsyncIterator:  # noqa: F811 - pg_db is the fixture
    made: list[LlmJudge] = []

    def build(**overrides: Any) -> LlmJudge:
        made.append(LlmJudge(LlmSettings(**llm_values(fake, **overrides)), pg_db.engine))
        return made[-1]

    yield build
    for judge in made:
        await judge.aclose()


def panel_config(**fields: Any) -> LlmJudgeConfig:
    return LlmJudgeConfig.model_validate({"panel": PANEL, "criteria": ["accuracy", TONE],
                                          **fields})


def make_items(count: int, run_id: uuid.UUID | None = None, step: int = 10) -> list[Item]:
    tag = uuid.uuid4().hex  # unique texts: no test hits another's cache entries
    return [Item(run_id=run_id, step=step, sample_index=i, epoch=step // 10,
                 prompt=f"question {i} [{tag}]", ground_truth=f"expected {i} [{tag}]",
                 prediction=f"answer {i} [{tag}]") for i in range(count)]


# --- custom criteria ---------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_custom_scale_verdicts_have_their_threshold_and_template(provider, fake,
                                                                       judge_for):
    model = GPT if provider == "openai" else CLAUDE
    brevity = {"name": "brevity", "rubric": "Is it short?", "scale_min": 0, "scale_max": 3,
               "threshold": 2.5}
    fake.model_scores = {model: {"tone": 4, "brevity": 2}}
    cfg = LlmJudgeConfig.model_validate({"provider": provider, "model": model,
                                         "criteria": [TONE, brevity, "clarity"]})
    verdicts = await judge_for().judge(USER, make_items(1), cfg)

    got = {v.criterion: (v.status, v.score, v.threshold, v.passed, v.prompt_version)
           for v in verdicts}
    assert got == {"tone": (SCORED, 4.0, 4.0, True, "v1-scale"),
                   "brevity": (SCORED, 2.0, 2.5, False, "v1-scale"),
                   "clarity": (SCORED, 6.0, 7.0, False, "v1")}
    by_criterion = {r.criterion: r for r in fake.requests}
    assert "from 1 (worst) to 5 (best)" in by_criterion["tone"].text
    assert "<integer 0-3>" in by_criterion["brevity"].text
    assert "from 1 (worst) to 10 (best)" in by_criterion["clarity"].text
    body = by_criterion["brevity"].body
    schema = (body["response_format"]["json_schema"]["schema"] if provider == "openai"
              else body["tools"][0]["input_schema"])
    assert schema["properties"]["score"]["enum"] == [0, 1, 2, 3]


@pytest.mark.parametrize(("score", "provider"), [(6, "openai"), (0, "anthropic"),
                                                 (9, "openai_compatible")])
async def test_a_score_outside_the_scale_is_unscored_never_clamped(score, provider, fake,
                                                                   judge_for):
    model = {"openai": GPT, "anthropic": CLAUDE, "openai_compatible": LOCAL}[provider]
    fake.model_scores = {model: {"tone": score}}
    cfg = LlmJudgeConfig.model_validate({
        "provider": provider, "model": model, "criteria": [TONE],
        "endpoint": "local" if provider == "openai_compatible" else None})
    (verdict,) = await judge_for().judge(USER, make_items(1), cfg)
    assert (verdict.status, verdict.score, verdict.passed) == (UNSCORED, 0.0, False)
    assert verdict.unscored_reason == f"unparseable reply: score {score} is outside 1..5"
    assert verdict.input_tokens == 500  # billed all the same
    assert len(fake.requests) == 1


# --- panels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["mean", "majority"])
async def test_panel_stores_each_member_and_the_combined_verdict(rule, fake, judge_for):
    items = make_items(2)
    verdicts = await judge_for().judge(USER, items, panel_config(combine=rule))

    assert len(verdicts) == 2 * 2 * 4 and len(fake.requests) == 2 * 2 * 3
    assert [(v.criterion, v.judge_model) for v in verdicts[:8]] == [
        (c, m) for c in ("accuracy", "tone") for m in [*MEMBERS, f"panel/{rule}"]]
    for index, verdict in enumerate(verdicts):
        member, criterion = index % 4, verdict.criterion
        assert verdict.status == SCORED
        if member < 3:
            model = (GPT, CLAUDE, LOCAL)[member]
            assert verdict.score == MODEL_SCORES[model][criterion]
            assert verdict.cost_usd == pytest.approx(CALL_COST if model != LOCAL else 0.0)
        else:
            score, passed = COMBINED[rule][criterion]
            assert (verdict.score, verdict.passed) == (pytest.approx(score), passed)
            assert (verdict.cost_usd, verdict.input_tokens, verdict.output_tokens) == (0, 0, 0)
            assert verdict.threshold == (7.0 if criterion == "accuracy" else 4.0)


async def test_combined_verdict_needs_the_min_scored_share(fake, judge_for):
    """Default share 0.5: two of three scored -> the mean of those two; one of three ->
    unscored, naming the members' reasons. Share 1.0: one unscored member is enough."""
    fake.model_scores = {GPT: {"accuracy": 9}, CLAUDE: {"accuracy": malformed()},
                         LOCAL: {"accuracy": 6}}
    cfg = panel_config(criteria=["accuracy"])
    verdicts = await judge_for().judge(USER, make_items(1), cfg)
    assert [v.status for v in verdicts] == [SCORED, UNSCORED, SCORED, SCORED]
    assert (verdicts[3].score, verdicts[3].passed) == (7.5, True)

    fake.model_scores[LOCAL] = {"accuracy": malformed()}
    judge = judge_for()
    verdicts = await judge.judge(USER, make_items(1), cfg)
    combined = verdicts[3]
    assert judge.counters["panel_unscored"] == 1
    assert [v.status for v in verdicts] == [SCORED, UNSCORED, UNSCORED, UNSCORED]
    assert combined.unscored_reason.startswith(
        "only 1 of 3 panel members scored (at least 0.5 of them must): "
        f"anthropic/{CLAUDE}: unparseable reply")
    assert combined.judge_model == "panel/mean" and combined.cost_usd == 0

    fake.model_scores[LOCAL] = {"accuracy": 6}
    strict = await judge_for(llm_panel_min_scored_share=1.0).judge(USER, make_items(1), cfg)
    assert strict[3].status == UNSCORED
    assert strict[3].unscored_reason.startswith("only 2 of 3 panel members scored")


async def test_a_failing_member_fails_the_panel_when_on_error_is_fail(fake, judge_for):
    """on_error fail: one member's failed call fails the whole panel's judging (raised once
    every member settled); on_error skip: that member is unscored, the rest combined."""
    fake.model_scores = {**MODEL_SCORES, CLAUDE: {"accuracy": server_error()}}
    failing = panel_config(criteria=["accuracy"], on_error="fail", max_retries=0)
    with pytest.raises(LlmJudgingFailed):
        await judge_for().judge(USER, make_items(1), failing)
    skipping = panel_config(criteria=["accuracy"], max_retries=0)
    verdicts = await judge_for().judge(USER, make_items(1), skipping)
    assert [v.status for v in verdicts] == [SCORED, UNSCORED, SCORED, SCORED]
    assert (verdicts[3].score, verdicts[3].reasoning) == (7.5, (
        f"mean 7.5 of 2 scored members (openai/{GPT} 8, openai_compatible/{LOCAL} 7)"))


async def test_budget_stops_every_member(fake, judge_for, pg_db):  # noqa: F811
    """The members share the run's budget (each call reserves about $0.0065 first): with
    $0.009 two calls fit, whichever member makes them; every other call of both members is
    unscored, and so is every combined verdict without enough scored members."""
    run_id = uuid.uuid4()
    cfg = LlmJudgeConfig.model_validate({"panel": PANEL[:2], "criteria": ["accuracy"],
                                         "concurrency": 1, "budget_usd": 0.009})
    verdicts = await judge_for().judge(USER, make_items(3, run_id), cfg)

    assert len(fake.requests) == 2
    members = [v for v in verdicts if not v.judge_model.startswith("panel/")]
    assert len(members) == 6 and sum(v.status == SCORED for v in members) == 2
    assert all(v.unscored_reason.startswith("budget exhausted") for v in members
               if v.status == UNSCORED)
    assert sum(v.cost_usd for v in verdicts) == pytest.approx(2 * CALL_COST)
    again = await judge_for().judge(USER, make_items(1, run_id, step=20), cfg)
    assert len(fake.requests) == 2 and {v.status for v in again} == {UNSCORED}
    async with pg_db.admin.connect() as conn:
        state = run_llm_state_table
        row = (await conn.execute(select(state).where(state.c.run_id == run_id))).one()
    assert row.budget_exhausted and row.spent_usd == pytest.approx(2 * CALL_COST)


def test_estimate_is_the_sum_of_the_members(fake):
    settings = LlmSettings(**llm_values(fake, llm_prices={GPT: PRICE, CLAUDE: ModelPrice(
        input_per_mtok=1.0, output_per_mtok=3.0)}))
    cfg = panel_config(sample_rate=0.5)
    est = cost.estimate(settings, cfg, 1000, 0)
    singles = [cost.estimate(settings, member, 1000, 0) for member in cfg.members()]
    assert est["judge_model"] == "panel/mean"
    assert est["judged_predictions"] == 500 and est["llm_calls"] == 3 * 500 * 2
    for field in ("llm_calls", "input_tokens", "output_tokens"):
        assert est[field] == sum(single[field] for single in singles)
    assert est["cost_usd"] == pytest.approx(sum(single["cost_usd"] for single in singles))
    assert [s["cost_usd"] > 0 for s in singles] == [True, True, False]
    unpriced = LlmJudgeConfig.model_validate({"panel": [PANEL[0], {
        "provider": "anthropic", "model": "claude-unpriced"}]})
    with pytest.raises(InvalidArgument) as caught:
        cost.estimate(settings, unpriced, 10, 0)
    assert [v.field for v in caught.value.violations] == ["config.llm.panel[1].model"]


# --- configs -----------------------------------------------------------------------------------

def criteria_with(**third: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": GPT,
            "criteria": ["accuracy", TONE, {**TONE, "name": "other", **third}]}


@pytest.mark.parametrize(("llm", "field", "says"), [
    (criteria_with(scale_max=1), "config.llm.criteria[2].scale_max",
     "must be above scale_min (1), got 1"),
    (criteria_with(scale_min=0, scale_max=200), "config.llm.criteria[2].scale_max",
     "the scale 0..200 has 201 points, above the maximum of 101"),
    (criteria_with(scale_max=2.5), "config.llm.criteria[2].scale_max",
     "Input should be a valid integer, got a number with a fractional part"),
    (criteria_with(threshold=6), "config.llm.criteria[2].threshold",
     "must be within the scale 1..5, got 6"),
    (criteria_with(threshold=math.nan), "config.llm.criteria[2].threshold",
     "must be a finite number, got nan"),
    (criteria_with(rubric=" "), "config.llm.criteria[2].rubric", "rubric text required"),
    (criteria_with(rubric="r" * 4001), "config.llm.criteria[2].rubric",
     "4001 characters exceed the maximum of 4000"),
    (criteria_with(name=""), "config.llm.criteria[2].name", "must be 1..256 characters"),
    (criteria_with(name="tone"), "config.llm.criteria[2].name",
     "criterion 'tone' is already criteria[1]"),
    (criteria_with(name="clarity"), "config.llm.criteria[2].name",
     "'clarity' is a standard or custom_criteria criterion: a criterion object needs a "
     "name of its own"),
    (criteria_with(colour="red"), "config.llm.criteria[2].colour",
     "Extra inputs are not permitted"),
    ({**criteria_with(), "thresholds": {"tone": 3}}, "config.llm.thresholds.tone",
     "a criterion object carries its own threshold (criteria[1].threshold)"),
    ({"panel": PANEL[:1]}, "config.llm.panel", "a panel has 2..3 members, got 1"),
    ({"panel": [*PANEL, PANEL[0]]}, "config.llm.panel", "a panel has 2..3 members, got 4"),
    ({"panel": [PANEL[0], {**PANEL[2], "endpoint": "elsewhere"}]},
     "config.llm.panel[1].endpoint", "unknown endpoint 'elsewhere' (configured: local)"),
    ({"panel": [PANEL[0], {"provider": "nope", "model": "m"}]},
     "config.llm.panel[1].provider",
     "Input should be 'openai', 'anthropic' or 'openai_compatible'"),
    ({"panel": [PANEL[0], {**PANEL[0], "endpoint": "local"}]}, "config.llm.panel[1]",
     f"same judge as panel[0] (openai/{GPT}): each member's judgments are stored under it"),
    ({"panel": PANEL, "model": GPT}, "config.llm.model",
     "not with a panel: each member of llm.panel names its own"),
    ({"panel": PANEL, "combine": "median"}, "config.llm.combine",
     "Input should be 'mean' or 'majority'"),
    ({"provider": "openai", "model": GPT, "combine": "mean"}, "config.llm.combine",
     "only with a panel (llm.panel)"),
    ({"model": GPT}, "config.llm.provider", "required (or a panel of judges in llm.panel)"),
])
def test_config_errors_name_the_exact_field(fake, llm, field, says):
    settings = JudgeSettings(_env_file=None, port=0, llm_max_panel_members=3,
                             **llm_values(fake))
    with pytest.raises(InvalidArgument) as caught:
        validate_judge_config(settings, {"llm": llm})
    found = {v.field: v.description for v in caught.value.violations}
    assert field in found and found[field] == says, found


def test_too_many_criterion_objects(fake):
    settings = JudgeSettings(_env_file=None, port=0, llm_max_custom_criteria=2,
                             **llm_values(fake))
    many = [{**TONE, "name": f"c{i}"} for i in range(3)]
    with pytest.raises(InvalidArgument) as caught:
        validate_judge_config(settings, {"llm": {"provider": "openai", "model": GPT,
                                                 "criteria": many}})
    assert {v.field: v.description for v in caught.value.violations} == {
        "config.llm.criteria": "3 criterion objects exceed the maximum of 2"}


def test_existing_configs_keep_their_cache_keys_and_requests():
    """A standard criterion's key is the sha256 of the parts it always had; a criterion
    object's key also covers its scale and threshold."""
    item = make_items(1)[0]
    cfg = LlmJudgeConfig(provider="openai", model=GPT)
    parts = ["u", "openai", "http://x/v1", GPT, "v1", "accuracy", "rubric", item.prompt,
             item.ground_truth, item.prediction]
    old = hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode()).hexdigest()
    assert cache_key("u", cfg, "http://x/v1", "v1", "accuracy", "rubric", item) == old
    scaled = {cache_key("u", cfg, "http://x/v1", "v1-scale", "tone", "rubric", item, own)
              for own in ((1, 5, 4.0), (1, 5, 3.0), (0, 5, 4.0), (1, 6, 4.0))}
    assert len(scaled) == 4 and old not in scaled
    assert cfg.members() == [cfg] and cfg.judge_model == f"openai/{GPT}"


async def test_standard_criteria_requests_are_unchanged(fake, judge_for):
    cfg = LlmJudgeConfig(provider="openai", model=GPT, criteria=["accuracy"])
    (verdict,) = await judge_for().judge(USER, make_items(1), cfg)
    assert (verdict.prompt_version, verdict.judge_model) == ("v1", f"openai/{GPT}")
    assert fake.requests[0].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "judge_verdict", "strict": True,
                                               "schema": {
            "type": "object",
            "properties": {
                "score": {"type": "integer", "enum": list(range(1, 11)),
                          "description": "Score on the criterion, 1 (worst) to 10 (best)."},
                "reasoning": {"type": "string", "description": "Why this score, briefly."},
                "confidence": {"type": "number",
                               "description": "Confidence in the score, 0 to 1."}},
            "required": ["score", "reasoning", "confidence"],
            "additionalProperties": False}}}
    assert fake.requests[0].body["messages"][0]["content"].startswith(
        "You are an impartial judge of a language model's responses. Score the RESPONSE on "
        "one criterion only, from 1 (worst) to 10 (best), following the rubric.")


# --- through the service -----------------------------------------------------------------------

@pytest.fixture
async def judge(judge_db, auth_settings, fake) -> AsyncIterator[Judge]:
    settings = judge_db.settings(worker_count=2, idle_poll_s=0.05, **llm_values(fake))
    running = await start(settings, auth_settings)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield Judge(judge_db, judge_pb2_grpc.JudgeServiceStub(channel), auth_settings)
    finally:
        await running.stop(0.5)


async def test_queued_panel_judgments_are_stored(judge, fake):
    """EnqueueJudging with a 3-member panel on a standard and a custom criterion: per item and
    criterion 3 member rows and 1 combined row (cost 0), the combined mean exact."""
    run_id = await judge.db.create_run(ALICE)
    config = {"rules": {"enabled": False},
              "llm": {"panel": PANEL, "combine": "mean", "criteria": ["accuracy", TONE]}}
    await judge.stub.EnqueueJudging(enqueue_request(run_id, 2, config), metadata=judge.md(ALICE))
    await tasks_done(judge, run_id, 2)
    rows = await judge.db.rows(
        "SELECT sample_index, criterion, judge_model, status, score, passed, threshold, "
        "cost_usd, prompt_version FROM judge.judgments WHERE run_id = :r "
        "ORDER BY sample_index, criterion, judge_model", r=judge.run(run_id))
    assert len(rows) == 2 * 2 * 4 and len(fake.requests) == 2 * 2 * 3
    for row in rows:
        assert row.status == SCORED
        assert row.prompt_version == ("v1" if row.criterion == "accuracy" else "v1-scale")
        if row.judge_model == "panel/mean":
            score, passed = COMBINED["mean"][row.criterion]
            assert (row.score, row.passed, row.cost_usd) == (pytest.approx(score), passed, 0)
        else:
            model = row.judge_model.split("/", 1)[1]
            assert row.score == MODEL_SCORES[model][row.criterion]
            assert row.cost_usd == pytest.approx(0.0 if model == LOCAL else CALL_COST)
    assert {row.judge_model for row in rows} == {*MEMBERS, "panel/mean"}


async def test_validate_judge_config_names_the_field(judge):
    bad = {"llm": {"panel": [PANEL[0], {"provider": "anthropic", "model": "claude-unpriced"}],
                   "criteria": ["accuracy", TONE, {**TONE, "name": "x", "scale_max": 0}]}}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await judge.stub.ValidateJudgeConfig(judge_pb2.ValidateJudgeConfigRequest(
            config=dict_to_struct(bad)), metadata=judge.md(ALICE))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(rich_status(caught.value)) == {
        "config.llm.criteria[2].scale_max": "must be above scale_min (1), got 0"}
    del bad["llm"]["criteria"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await judge.stub.ValidateJudgeConfig(judge_pb2.ValidateJudgeConfigRequest(
            config=dict_to_struct(bad)), metadata=judge.md(ALICE))
    assert field_violations(rich_status(caught.value)) == {
        "config.llm.panel[1].model": "no price configured for anthropic/claude-unpriced "
                                     "(EPOCHLENS_JUDGE_LLM_PRICES)"}
    fine = await judge.stub.ValidateJudgeConfig(judge_pb2.ValidateJudgeConfigRequest(
        config=dict_to_struct({"llm": {"panel": PANEL, "criteria": [TONE]}})),
        metadata=judge.md(ALICE))
    assert fine.llm_judging and list(fine.warnings) == []


async def test_create_run_names_the_field_under_config_judge(stack, writer_stub):
    section = {"llm": {"provider": "openai", "model": "gpt-4o",
                       "criteria": ["accuracy", TONE, {**TONE, "name": "x", "threshold": 9}]}}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_run(writer_stub, stack.metadata(f"panel-{uuid.uuid4().hex[:6]}"),
                         config=dict_to_struct({"judge": section}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(rich_status(caught.value)) == {
        "config.judge.llm.criteria[2].threshold": "must be within the scale 1..5, got 9"}


HOSTILE = [None, "", "\x00", "x" * 70_000, 1e300, -1e300, math.nan, math.inf, True, [], {},
           [1], {"a": 1}, 3, 2.5, -1]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_criteria_and_panels_are_invalid_argument_only(fake, value):
    """Every field of a criterion object and of a panel, set to hostile values: validation
    and the cost estimate answer InvalidArgument or succeed, never another error."""
    settings = JudgeSettings(_env_file=None, port=0, **llm_values(fake))
    single = {"provider": "openai", "model": GPT}
    configs = [{**single, "criteria": [{**TONE, field: value}]} for field in TONE]
    configs += [{"panel": value}, {"panel": [value, value]}, {**single, "criteria": [value]},
                {"panel": [{**PANEL[0], "model": value}, PANEL[1]]}, {**single, "combine": value},
                {**single, "criteria": [TONE], "thresholds": {"tone": value}},
                {"provider": value, "model": value}]
    for llm in configs:
        try:
            config = validate_judge_config(settings, {"llm": llm})
            assert config.llm is not None
            cost.estimate(settings, config.llm, 10, 0)  # a paid model without a price: invalid
        except InvalidArgument:
            continue
