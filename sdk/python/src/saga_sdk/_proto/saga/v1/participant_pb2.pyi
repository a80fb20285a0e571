import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_ACTION: _ClassVar[Phase]
    PHASE_COMPENSATION: _ClassVar[Phase]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_SUCCEEDED: _ClassVar[Outcome]
    OUTCOME_FAILED: _ClassVar[Outcome]
    OUTCOME_RETRY: _ClassVar[Outcome]
PHASE_UNSPECIFIED: Phase
PHASE_ACTION: Phase
PHASE_COMPENSATION: Phase
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_SUCCEEDED: Outcome
OUTCOME_FAILED: Outcome
OUTCOME_RETRY: Outcome

class InvokeRequest(_message.Message):
    __slots__ = ("saga_id", "definition", "step", "phase", "handler", "attempt", "idempotency_key", "input_json", "outputs_json", "action_output_json", "deadline", "arrive_by", "lease_epoch")
    class OutputsJsonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_JSON_FIELD_NUMBER: _ClassVar[int]
    ACTION_OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    ARRIVE_BY_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    definition: str
    step: str
    phase: Phase
    handler: str
    attempt: int
    idempotency_key: str
    input_json: str
    outputs_json: _containers.ScalarMap[str, str]
    action_output_json: str
    deadline: _timestamp_pb2.Timestamp
    arrive_by: _timestamp_pb2.Timestamp
    lease_epoch: int
    def __init__(self, saga_id: _Optional[str] = ..., definition: _Optional[str] = ..., step: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., handler: _Optional[str] = ..., attempt: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., input_json: _Optional[str] = ..., outputs_json: _Optional[_Mapping[str, str]] = ..., action_output_json: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., arrive_by: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_epoch: _Optional[int] = ...) -> None: ...

class InvokeResponse(_message.Message):
    __slots__ = ("outcome", "output_json", "error")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    output_json: str
    error: str
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., output_json: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
