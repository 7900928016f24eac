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
    __slots__ = ("status", "message", "checks")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    status: str
    message: str
    checks: _containers.RepeatedCompositeFieldContainer[SmokeTestCheck]
    def __init__(self, status: _Optional[str] = ..., message: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[SmokeTestCheck, _Mapping]]] = ...) -> None: ...

class SmokeTestCheck(_message.Message):
    __slots__ = ("name", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    serving: bool
    def __init__(self, name: _Optional[str] = ..., serving: _Optional[bool] = ...) -> None: ...
