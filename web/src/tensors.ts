// Tensors to and from JSON nested lists: dtype + shape + raw little-endian bytes, as the modelgrid API carries them.
import { create } from "@bufbuild/protobuf";
import { DataType, TensorSchema, type Tensor } from "./gen/modelgrid/common/v1/common_pb";

type Scalar = number | bigint | boolean | string;
export type Nested = Scalar | Nested[];

interface Layout {
  size: number;
  write(view: DataView, offset: number, value: Scalar): void;
  read(view: DataView, offset: number): Scalar;
}

const num = (value: Scalar) => Number(value);
const big = (value: Scalar) => BigInt(typeof value === "number" ? Math.trunc(value) : value);

/** Fixed-size element layouts by dtype (STRING is variable-sized and handled apart). */
const LAYOUTS: Partial<Record<DataType, Layout>> = {
  [DataType.BOOL]: { size: 1, write: (v, o, x) => v.setUint8(o, x ? 1 : 0), read: (v, o) => v.getUint8(o) !== 0 },
  [DataType.UINT8]: { size: 1, write: (v, o, x) => v.setUint8(o, num(x)), read: (v, o) => v.getUint8(o) },
  [DataType.INT8]: { size: 1, write: (v, o, x) => v.setInt8(o, num(x)), read: (v, o) => v.getInt8(o) },
  [DataType.UINT16]: { size: 2, write: (v, o, x) => v.setUint16(o, num(x), true), read: (v, o) => v.getUint16(o, true) },
  [DataType.INT16]: { size: 2, write: (v, o, x) => v.setInt16(o, num(x), true), read: (v, o) => v.getInt16(o, true) },
  [DataType.UINT32]: { size: 4, write: (v, o, x) => v.setUint32(o, num(x), true), read: (v, o) => v.getUint32(o, true) },
  [DataType.INT32]: { size: 4, write: (v, o, x) => v.setInt32(o, num(x), true), read: (v, o) => v.getInt32(o, true) },
  [DataType.UINT64]: {
    size: 8,
    write: (v, o, x) => v.setBigUint64(o, big(x), true),
    read: (v, o) => v.getBigUint64(o, true),
  },
  [DataType.INT64]: {
    size: 8,
    write: (v, o, x) => v.setBigInt64(o, big(x), true),
    read: (v, o) => v.getBigInt64(o, true),
  },
  [DataType.FLOAT32]: {
    size: 4,
    write: (v, o, x) => v.setFloat32(o, num(x), true),
    read: (v, o) => v.getFloat32(o, true),
  },
  [DataType.FLOAT64]: {
    size: 8,
    write: (v, o, x) => v.setFloat64(o, num(x), true),
    read: (v, o) => v.getFloat64(o, true),
  },
  [DataType.BFLOAT16]: {
    size: 2,
    write: (v, o, x) => v.setUint16(o, float32Bits(num(x)) >>> 16, true),
    read: (v, o) => bitsFloat32(v.getUint16(o, true) << 16),
  },
  [DataType.FLOAT16]: {
    size: 2,
    write: () => {
      throw new Error("the console cannot encode float16 inputs");
    },
    read: (v, o) => halfToNumber(v.getUint16(o, true)),
  },
};

function float32Bits(value: number): number {
  const view = new DataView(new ArrayBuffer(4));
  view.setFloat32(0, value, true);
  return view.getUint32(0, true);
}

function bitsFloat32(bits: number): number {
  const view = new DataView(new ArrayBuffer(4));
  view.setUint32(0, bits >>> 0, true);
  return view.getFloat32(0, true);
}

function halfToNumber(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** Shape of a rectangular nested list; throws on ragged lists. */
export function shapeOf(value: Nested): number[] {
  if (!Array.isArray(value)) return [];
  const inner = value.length > 0 ? shapeOf(value[0]) : [];
  for (const item of value) {
    if (JSON.stringify(shapeOf(item)) !== JSON.stringify(inner)) throw new Error("the input list is ragged");
  }
  return [value.length, ...inner];
}

function flatten(value: Nested, out: Scalar[] = []): Scalar[] {
  if (Array.isArray(value)) for (const item of value) flatten(item, out);
  else out.push(value);
  return out;
}

/** Encodes a JSON value (a scalar or rectangular nested list) as a tensor of `dtype`. */
export function encodeTensor(value: Nested, dtype: DataType): Tensor {
  const shape = shapeOf(value);
  const elements = flatten(value);
  let bytes: Uint8Array;
  if (dtype === DataType.STRING) {
    const encoded = elements.map((element) => new TextEncoder().encode(String(element)));
    bytes = new Uint8Array(encoded.reduce((total, e) => total + 4 + e.length, 0));
    const view = new DataView(bytes.buffer);
    let offset = 0;
    for (const element of encoded) {
      view.setUint32(offset, element.length, true);
      bytes.set(element, offset + 4);
      offset += 4 + element.length;
    }
  } else {
    const layout = LAYOUTS[dtype];
    if (!layout) throw new Error(`unsupported dtype ${DataType[dtype]}`);
    bytes = new Uint8Array(elements.length * layout.size);
    const view = new DataView(bytes.buffer);
    elements.forEach((element, i) => layout.write(view, i * layout.size, element));
  }
  return create(TensorSchema, { dtype, shape: shape.map(BigInt), rawData: bytes });
}

/** Decodes a tensor's raw bytes into a nested list of its shape. */
export function decodeTensor(tensor: Tensor): Nested {
  const view = new DataView(tensor.rawData.buffer, tensor.rawData.byteOffset, tensor.rawData.byteLength);
  const elements: Scalar[] = [];
  if (tensor.dtype === DataType.STRING) {
    for (let offset = 0; offset < view.byteLength; ) {
      const length = view.getUint32(offset, true);
      elements.push(new TextDecoder().decode(tensor.rawData.subarray(offset + 4, offset + 4 + length)));
      offset += 4 + length;
    }
  } else {
    const layout = LAYOUTS[tensor.dtype];
    if (!layout) throw new Error(`unsupported dtype ${DataType[tensor.dtype]}`);
    for (let offset = 0; offset + layout.size <= view.byteLength; offset += layout.size) {
      elements.push(layout.read(view, offset));
    }
  }
  return reshape(elements, tensor.shape.map(Number));
}

function reshape(elements: Scalar[], shape: number[]): Nested {
  if (shape.length === 0) return elements[0];
  const [size, ...rest] = shape;
  const stride = rest.reduce((product, dim) => product * dim, 1);
  return Array.from({ length: size }, (_, i) => reshape(elements.slice(i * stride, (i + 1) * stride), rest));
}

/** JSON text of a decoded tensor (bigints as plain numbers, floats shortened). */
export function formatTensor(value: Nested): string {
  return JSON.stringify(value, (_key, item) => {
    if (typeof item === "bigint") return Number(item);
    if (typeof item === "number" && !Number.isInteger(item)) return Number(item.toPrecision(6));
    return item;
  });
}
