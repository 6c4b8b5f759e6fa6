"""CreateRun's check of a run's judge section by the judge service itself.

When judging is on (judge_address set), CreateRun sends the "judge" section of the run's
config to JudgeService.ValidateJudgeConfig, with a token minted for the caller (as the outbox
dispatcher does), over the dispatcher's channel. So a section the judge would refuse when the
predictions are handed off (sample_rate 2.0, a budget over its ceiling, an unknown provider)
is refused now, as INVALID_ARGUMENT with the judge's field violations under `config.judge`.
A judge that cannot be reached makes CreateRun UNAVAILABLE (the trainer client retries).
"""

import logging
from collections import Counter
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.common.convert import dict_to_struct
from services.common.errors import FieldViolation, InvalidArgument, Unavailable
from services.writer.config import WriterSettings

log = logging.getLogger(__name__)

SECTION = "judge"
# Where the judge's violations are (its config root) and where they are in a run's config.
JUDGE_PREFIX, RUN_PREFIX = "config", f"config.{SECTION}"
# The judge is restarting, overloaded or unreachable: the same CreateRun may succeed later.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.CANCELLED})


class JudgeCheckFailed(RuntimeError):
    """The judge answered the check with an error that is neither the config's fault nor
    transient (for example a token it rejects): a misconfigured deployment, INTERNAL."""


class JudgeConfigCheck:
    """Asks the judge whether a run's judge section is one it accepts."""

    def __init__(self, stub: judge_pb2_grpc.JudgeServiceStub, auth: AuthSettings,
                 settings: WriterSettings) -> None:
        self._stub = stub
        self._auth = auth
        self._settings = settings
        self.counts: Counter[str] = Counter()

    async def check(self, user_id: str, config: dict[str, Any]) -> None:
        """Returns when the run config has no judge section or the judge accepts it; raises
        InvalidArgument (fields config.judge...), Unavailable or JudgeCheckFailed."""
        if SECTION not in config:
            return
        section = config[SECTION]
        if not isinstance(section, dict):
            raise InvalidArgument([FieldViolation(
                RUN_PREFIX, f"must be an object (the judge config), got {type(section).__name__}")])
        metadata = (("authorization", f"Bearer {mint_token(self._auth, user_id)}"),)
        try:
            reply = await self._stub.ValidateJudgeConfig(
                judge_pb2.ValidateJudgeConfigRequest(config=dict_to_struct(section)),
                timeout=self._settings.judge_check_timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._refused(user_id, exc) from exc
        for warning in reply.warnings:
            log.warning("run config of %s: the judge says %s", user_id, warning)

    def _refused(self, user_id: str, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        self.counts[code.name] += 1
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(run_violations(exc))
        if code in TRANSIENT_CODES:
            log.warning("judge unavailable for the judge config check of %s's CreateRun: %s: "
                        "%s (%d so far)", user_id, code.name, exc.details(),
                        self.counts[code.name])
            return Unavailable(f"the judge service cannot check the run's judge config now "
                               f"({code.name}); retry later", {"service": "judge"})
        log.error("judge refused the judge config check of %s's CreateRun: %s: %s (%d so far)",
                  user_id, code.name, exc.details(), self.counts[code.name])
        return JudgeCheckFailed(f"judge answered {code.name}: {exc.details()}")


def run_violations(exc: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """The judge's field violations moved under config.judge; its message when it sent none."""
    status = rpc_status.from_call(exc)
    violations = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(_under_section(v.field), v.description)
                           for v in bad.field_violations]
    return violations or [FieldViolation(RUN_PREFIX, exc.details() or "refused by the judge")]


def _under_section(field: str) -> str:
    if field == JUDGE_PREFIX or field.startswith(JUDGE_PREFIX + "."):
        return RUN_PREFIX + field[len(JUDGE_PREFIX):]
    return f"{RUN_PREFIX}.{field}"
