from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SmokeTestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SmokeTestResponse(_message.Message):
    __slots__ = ("status", "message", "checks", "event_loop_lag_seconds")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOOP_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    status: str
    message: str
    checks: _containers.RepeatedCompositeFieldContainer[SmokeTestCheck]
    event_loop_lag_seconds: float
    def __init__(self, status: _Optional[str] = ..., message: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[SmokeTestCheck, _Mapping]]] = ..., event_loop_lag_seconds: _Optional[float] = ...) -> None: ...

class SmokeTestCheck(_message.Message):
    __slots__ = ("name", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    serving: bool
    def __init__(self, name: _Optional[str] = ..., serving: _Optional[bool] = ...) -> None: ...
