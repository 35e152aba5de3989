// NPZ files (what np.savez writes: a zip of .npy arrays) read into tensors, for the results of bulk prediction jobs.
import { create } from "@bufbuild/protobuf";
import { DataType, TensorSchema, type Tensor } from "./gen/modelgrid/common/v1/common_pb";

/** numpy dtype descriptors (little-endian or byte-sized) and the tensor dtypes they are. */
const DTYPES: Record<string, DataType> = {
  "|b1": DataType.BOOL,
  "|u1": DataType.UINT8,
  "|i1": DataType.INT8,
  "<u2": DataType.UINT16,
  "<i2": DataType.INT16,
  "<u4": DataType.UINT32,
  "<i4": DataType.INT32,
  "<u8": DataType.UINT64,
  "<i8": DataType.INT64,
  "<f2": DataType.FLOAT16,
  "<f4": DataType.FLOAT32,
  "<f8": DataType.FLOAT64,
};

const END_OF_DIRECTORY = 0x06054b50;
const DIRECTORY_ENTRY = 0x02014b50;
const LOCAL_HEADER = 0x04034b50;

async function inflate(data: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([data as BlobPart]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** The members of a zip file by name (stored or deflated), from its central directory. */
async function unzip(bytes: Uint8Array): Promise<Map<string, Uint8Array>> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let end = bytes.length - 22;
  while (end >= 0 && view.getUint32(end, true) !== END_OF_DIRECTORY) end -= 1;
  if (end < 0) throw new Error("the results are not a zip file (NPZ)");
  const count = view.getUint16(end + 10, true);
  let at = view.getUint32(end + 16, true);
  const members = new Map<string, Uint8Array>();
  for (let i = 0; i < count; i += 1) {
    if (view.getUint32(at, true) !== DIRECTORY_ENTRY) throw new Error("the NPZ's zip directory is damaged");
    const method = view.getUint16(at + 10, true);
    const compressed = view.getUint32(at + 20, true);
    const nameLength = view.getUint16(at + 28, true);
    const skip = nameLength + view.getUint16(at + 30, true) + view.getUint16(at + 32, true);
    const local = view.getUint32(at + 42, true);
    const name = new TextDecoder().decode(bytes.subarray(at + 46, at + 46 + nameLength));
    if (compressed === 0xffffffff || local === 0xffffffff) throw new Error("the NPZ is too large to read here");
    if (view.getUint32(local, true) !== LOCAL_HEADER) throw new Error("the NPZ's zip entries are damaged");
    const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    const data = bytes.subarray(start, start + compressed);
    if (method === 0) members.set(name, data);
    else if (method === 8) members.set(name, await inflate(data));
    else throw new Error(`${name}: zip compression method ${method} is not supported`);
    at += 46 + skip;
  }
  return members;
}

/** One .npy array as a tensor (C order, little-endian numbers). */
function npyTensor(name: string, bytes: Uint8Array): Tensor {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes[0] !== 0x93 || new TextDecoder().decode(bytes.subarray(1, 6)) !== "NUMPY") {
    throw new Error(`${name} is not an .npy array`);
  }
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const descr = header.match(/'descr':\s*'([^']+)'/)?.[1] ?? "";
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)?.[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error(`${name} is in Fortran order`);
  const dtype = DTYPES[descr];
  if (dtype === undefined || shape === undefined) throw new Error(`${name} holds ${descr || "an unknown type"}`);
  const dims = shape.split(",").map((d) => d.trim()).filter(Boolean).map((d) => BigInt(d));
  return create(TensorSchema, { dtype, shape: dims, rawData: bytes.slice(start + headerLength) });
}

/** The arrays of an NPZ file by name (without the .npy suffix). */
export async function readNpz(bytes: Uint8Array): Promise<Record<string, Tensor>> {
  const arrays: Record<string, Tensor> = {};
  for (const [member, data] of await unzip(bytes)) {
    const name = member.replace(/\.npy$/, "");
    arrays[name] = npyTensor(name, data);
  }
  return arrays;
}
