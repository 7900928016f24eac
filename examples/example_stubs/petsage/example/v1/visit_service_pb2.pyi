from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RecordVisitRequest(_message.Message):
    __slots__ = ("pet",)
    PET_FIELD_NUMBER: _ClassVar[int]
    pet: str
    def __init__(self, pet: _Optional[str] = ...) -> None: ...

class RecordVisitResponse(_message.Message):
    __slots__ = ("pet", "visits", "replica")
    PET_FIELD_NUMBER: _ClassVar[int]
    VISITS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    pet: str
    visits: int
    replica: str
    def __init__(self, pet: _Optional[str] = ..., visits: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...
