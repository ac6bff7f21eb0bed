"""A minimal reader for TFLite flatbuffers (the parts of `schema.fbs` a weight importer needs).

No TensorFlow, LiteRT or `flatbuffers` package is needed: the flatbuffer wire format is small (a table is
an int32 offset back to its vtable, the vtable lists uint16 field offsets; vectors and strings are a uint32
length then the items), and the field ids below are those of the TFLite schema (`schema.fbs`, stable since
TF 1.x; new fields are only ever appended).
"""
import dataclasses
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

from deeplab_jax.convert.tf_names import ConversionError

# BuiltinOperator codes (schema.fbs) of the ops the DeepLab graphs use.
OP_NAMES = {0: 'ADD', 1: 'AVERAGE_POOL_2D', 2: 'CONCATENATION', 3: 'CONV_2D', 4: 'DEPTHWISE_CONV_2D',
            6: 'DEQUANTIZE', 18: 'MUL', 19: 'RELU', 21: 'RELU6', 22: 'RESHAPE', 23: 'RESIZE_BILINEAR',
            40: 'MEAN', 41: 'SUB', 56: 'ARG_MAX', 114: 'QUANTIZE'}
TENSOR_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
ACTIVATIONS = {0: 'NONE', 1: 'RELU', 2: 'RELU_N1_TO_1', 3: 'RELU6'}
PADDINGS = {0: 'SAME', 1: 'VALID'}


class _Table:
  """A flatbuffer table at byte `pos` of `buf`."""

  def __init__(self, buf: bytes, pos: int):
    self.buf, self.pos = buf, pos
    self.vtable = pos - struct.unpack_from('<i', buf, pos)[0]
    self.vtable_size = struct.unpack_from('<H', buf, self.vtable)[0]

  def _field(self, field_id: int) -> Optional[int]:
    entry = 4 + 2 * field_id
    if entry >= self.vtable_size:
      return None
    offset = struct.unpack_from('<H', self.buf, self.vtable + entry)[0]
    return self.pos + offset if offset else None

  def scalar(self, field_id: int, fmt: str, default=0):
    at = self._field(field_id)
    return default if at is None else struct.unpack_from('<' + fmt, self.buf, at)[0]

  def _indirect(self, at: int) -> int:
    return at + struct.unpack_from('<I', self.buf, at)[0]

  def table(self, field_id: int) -> Optional['_Table']:
    at = self._field(field_id)
    return None if at is None else _Table(self.buf, self._indirect(at))

  def _vector(self, field_id: int) -> Tuple[int, int]:
    at = self._field(field_id)
    if at is None:
      return 0, 0
    start = self._indirect(at)
    return start + 4, struct.unpack_from('<I', self.buf, start)[0]

  def tables(self, field_id: int) -> List['_Table']:
    start, length = self._vector(field_id)
    return [_Table(self.buf, self._indirect(start + 4 * i)) for i in range(length)]

  def array(self, field_id: int, dtype) -> np.ndarray:
    start, length = self._vector(field_id)
    return np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder('<'), count=length,
                         offset=start).copy() if length else np.zeros((0,), dtype)

  def string(self, field_id: int) -> str:
    start, length = self._vector(field_id)
    return self.buf[start:start + length].decode('utf-8', 'replace')


@dataclasses.dataclass
class Tensor:
  """One TFLite tensor: its constant data (if any) and quantization parameters."""
  index: int
  name: str
  shape: Tuple[int, ...]
  dtype: type
  data: Optional[np.ndarray]            # raw stored values (quantized for quantized models)
  scale: np.ndarray                     # per-tensor ([1]) or per-axis scales; empty if not quantized
  zero_point: np.ndarray
  quantized_dimension: int

  @property
  def quantized(self) -> bool:
    return self.scale.size > 0 and self.dtype != np.float32

  def dequantized(self) -> np.ndarray:
    """The stored constant as float32 (real = (q - zero_point) * scale, per axis if so stored)."""
    if self.data is None:
      raise ValueError(f'TFLite tensor {self.name!r} holds no constant data.')
    values = self.data.astype(np.float32 if self.dtype != np.int64 else np.float64)
    if self.quantized:
      shape = [1] * values.ndim
      if self.scale.size > 1:
        shape[self.quantized_dimension] = -1
      scale = self.scale.astype(np.float64).reshape(shape)
      zero_point = self.zero_point.astype(np.float64).reshape(shape) if self.zero_point.size else 0.0
      values = (values - zero_point) * scale
    return values.astype(np.float32)


@dataclasses.dataclass
class Operator:
  """One TFLite op with its builtin options decoded into a dict."""
  index: int
  op: str
  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]
  options: Dict[str, object]


@dataclasses.dataclass
class Graph:
  """The first subgraph of a TFLite model."""
  tensors: List[Tensor]
  operators: List[Operator]
  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]


def _options(op: str, table: Optional[_Table]) -> Dict[str, object]:
  """Decodes the builtin options of the op kinds whose semantics the importer checks."""
  if table is None:
    return {}
  if op == 'CONV_2D':
    return dict(padding=PADDINGS[table.scalar(0, 'b')], stride=(table.scalar(2, 'i'), table.scalar(1, 'i')),
                activation=ACTIVATIONS.get(table.scalar(3, 'b'), '?'),
                dilation=(table.scalar(5, 'i', 1), table.scalar(4, 'i', 1)))
  if op == 'DEPTHWISE_CONV_2D':
    return dict(padding=PADDINGS[table.scalar(0, 'b')], stride=(table.scalar(2, 'i'), table.scalar(1, 'i')),
                depth_multiplier=table.scalar(3, 'i'), activation=ACTIVATIONS.get(table.scalar(4, 'b'), '?'),
                dilation=(table.scalar(6, 'i', 1), table.scalar(5, 'i', 1)))
  if op == 'AVERAGE_POOL_2D':
    return dict(padding=PADDINGS[table.scalar(0, 'b')], stride=(table.scalar(2, 'i'), table.scalar(1, 'i')),
                window=(table.scalar(4, 'i'), table.scalar(3, 'i')),
                activation=ACTIVATIONS.get(table.scalar(5, 'b'), '?'))
  if op == 'RESIZE_BILINEAR':
    return dict(align_corners=bool(table.scalar(2, 'B')), half_pixel_centers=bool(table.scalar(3, 'B')))
  if op == 'CONCATENATION':
    return dict(axis=table.scalar(0, 'i'), activation=ACTIVATIONS.get(table.scalar(1, 'b'), '?'))
  if op == 'ADD':
    return dict(activation=ACTIVATIONS.get(table.scalar(0, 'b'), '?'))
  return {}


def read_tflite(path: str) -> Graph:
  """Parses a `.tflite` file into its tensors (with constants) and ops (with options).

  Raises:
    ConversionError (a ValueError): naming `path`, if the file is not a TFLite flatbuffer, is truncated or
      damaged (offsets or data beyond its end), or has several subgraphs.
  """
  with open(path, 'rb') as f:
    buf = f.read()
  if len(buf) < 8:
    raise ConversionError(f'{path} is truncated: {len(buf)} bytes, too short for a TFLite flatbuffer.')
  if buf[4:8] != b'TFL3':
    raise ConversionError(f'{path} is not a TFLite flatbuffer: no TFL3 identifier at bytes 4-8 (it starts '
                          f'{buf[:8]!r}). Pass a .tflite model.')
  try:
    return _parse_model(buf, path)
  except ConversionError:
    raise
  except (struct.error, IndexError, KeyError, ValueError, OverflowError, UnicodeDecodeError) as e:
    # Offsets that point past the end of the buffer: the file was cut short (or overwritten).
    kind = 'struct.error' if isinstance(e, struct.error) else type(e).__name__
    raise ConversionError(
        f'{path} is truncated or not a valid TFLite file ({len(buf)} bytes; {kind} while parsing: '
        f'{" ".join(str(e).split())}). Download or export it again.') from e


def _parse_model(buf: bytes, path: str) -> Graph:
  """`read_tflite` on the file's bytes; struct/numpy errors mean the file is damaged."""
  model = _Table(buf, struct.unpack_from('<I', buf, 0)[0])
  opcodes = []
  for code in model.tables(1):
    # Old files only fill the int8 deprecated code; new ones put codes >127 in the int32 field.
    opcodes.append(max(code.scalar(0, 'b'), code.scalar(3, 'i')))
  buffers = []
  for buffer in model.tables(4):
    offset, size = buffer.scalar(1, 'Q'), buffer.scalar(2, 'Q')
    if offset > 1:  # models over 2 GB keep buffers after the flatbuffer
      buffers.append(np.frombuffer(buf, np.uint8, count=size, offset=offset))
    else:
      buffers.append(buffer.array(0, np.uint8))
  subgraphs = model.tables(2)
  if len(subgraphs) != 1:
    raise ConversionError(f'{path} has {len(subgraphs)} subgraphs; DeepLab models have one.')
  graph = subgraphs[0]
  tensors = []
  for index, t in enumerate(graph.tables(0)):
    type_code = t.scalar(1, 'b')
    if type_code not in TENSOR_TYPES:
      raise ConversionError(f'{path}: tensor {t.string(3)!r} has an unsupported type code '
                            f'{type_code}.')
    dtype = TENSOR_TYPES[type_code]
    shape = tuple(int(d) for d in t.array(0, np.int32))
    raw = buffers[t.scalar(2, 'I')] if buffers else np.zeros((0,), np.uint8)
    data = None
    if raw.size:
      data = np.frombuffer(raw.tobytes(), np.dtype(dtype).newbyteorder('<')).astype(dtype).reshape(shape)
    quant = t.table(4)
    scale = quant.array(2, np.float32) if quant else np.zeros((0,), np.float32)
    zero_point = quant.array(3, np.int64) if quant else np.zeros((0,), np.int64)
    tensors.append(Tensor(index, t.string(3), shape, dtype, data, scale, zero_point,
                          quant.scalar(6, 'i') if quant else 0))
  operators = []
  for index, o in enumerate(graph.tables(3)):
    code = opcodes[o.scalar(0, 'I')]
    op = OP_NAMES.get(code, f'BUILTIN_{code}')
    operators.append(Operator(index, op, tuple(int(i) for i in o.array(1, np.int32)),
                              tuple(int(i) for i in o.array(2, np.int32)), _options(op, o.table(4))))
  return Graph(tensors, operators, tuple(int(i) for i in graph.array(1, np.int32)),
               tuple(int(i) for i in graph.array(2, np.int32)))
