"""A numpy reader and writer for the safetensors format, so weight import needs no torch.

Layout: an 8-byte little-endian unsigned header length n, n bytes of JSON mapping each tensor
name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows
the header; an optional "__metadata__" entry holds strings), then the raw little-endian data.
"""
import json
import struct
from typing import Optional

import numpy as np

from dit_jax import fs

# safetensors dtype -> numpy storage dtype (little-endian). BF16 is stored as its raw 16 bits.
_STORAGE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_HEADER_LIMIT = 100 * 2 ** 20  # the reference implementation refuses larger headers too.


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
  """Raw bfloat16 bit patterns (uint16) -> float32: bf16 is the top half of a float32."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
  """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
  bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
  rounded = bits + 0x7FFF + ((bits >> 16) & 1)
  out = (rounded >> 16).astype(np.uint16)
  nan = np.isnan(x)
  out[nan] = 0x7FC0  # keep NaNs NaN (rounding could carry them into infinity).
  return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a .safetensors file (a local path or a URL) as float32 numpy arrays
  (F64/F32/F16/BF16).

  Raises:
    ValueError: a malformed file, or a dtype other than the float ones above.
  """
  # A local file is memory-mapped (only what is needed is read, each tensor copied once); a
  # URL's file is read whole into memory.
  if fs.is_local(path):
    size = fs.size(path)
    contents = np.memmap(path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
  else:
    contents = np.frombuffer(fs.read_bytes(path), np.uint8)
    size = contents.size
  if size < 8:
    raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
  (header_len,) = struct.unpack("<Q", contents[:8].tobytes())
  if header_len > min(_HEADER_LIMIT, size - 8):
    raise ValueError(f"{path}: header length {header_len} exceeds the file ({size} bytes)")
  try:
    header = json.loads(contents[8:8 + header_len].tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable safetensors header: {e}") from e
  data = contents[8 + header_len:]
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype, shape = info.get("dtype"), tuple(info.get("shape", ()))
    begin, end = info.get("data_offsets", (0, -1))
    if dtype not in _STORAGE:
      raise ValueError(f"{path}: tensor '{name}' has dtype {dtype}; supported: "
                       f"{sorted(_STORAGE)}")
    storage = np.dtype(_STORAGE[dtype])
    if not 0 <= begin <= end <= data.size or end - begin != storage.itemsize * int(
        np.prod(shape, dtype=np.int64)):
      raise ValueError(f"{path}: tensor '{name}' has data_offsets {[begin, end]} that do not "
                       f"fit shape {list(shape)} of {dtype} in {data.size} data bytes")
    raw = np.frombuffer(data, storage, count=(end - begin) // storage.itemsize,
                        offset=begin).reshape(shape)
    array = bf16_bits_to_float32(raw) if dtype == "BF16" else raw.astype(np.float32)
    tensors[name] = array
  del data, contents
  return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "F32",
                      metadata: Optional[dict[str, str]] = None) -> None:
  """Writes float arrays to a .safetensors file (a local path or a URL; `fs.write_bytes`: whole
  or not at all), all stored as `dtype` (F32, F16 or BF16)."""
  if dtype not in ("F32", "F16", "BF16"):
    raise ValueError(f"write_safetensors: unsupported dtype {dtype}")
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  blobs, offset = [], 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name], np.float32)
    if dtype == "BF16":
      blob = float32_to_bf16_bits(array).astype("<u2").tobytes()
    else:
      blob = array.astype(_STORAGE[dtype]).tobytes()
    header[name] = {"dtype": dtype, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment.
  fs.write_bytes(path, b"".join([struct.pack("<Q", len(encoded)), encoded] + blobs))
