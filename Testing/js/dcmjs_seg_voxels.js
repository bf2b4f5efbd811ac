// Reads a DICOM SEG with dcmjs (the OHIF viewer's DICOM library) and prints, per segment, what a viewer gets:
// its label, the source instances its frames reference and its voxel count (set bits of its frames).
// Usage: node dcmjs_seg_voxels.js NODE_MODULES_DIR SEG_FILE  -> one JSON object on stdout.
"use strict";
const fs = require("fs");
const path = require("path");
const dcmjs = require(path.join(process.argv[2], "dcmjs"));

const bytes = fs.readFileSync(process.argv[3]);
const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
const dicom = dcmjs.data.DicomMessage.readFile(buffer);
const seg = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicom.dict);
const asList = (value) => (value === undefined ? [] : Array.isArray(value) ? value : [value]);

const rows = seg.Rows, columns = seg.Columns, frameBits = rows * columns;
const frames = asList(seg.PerFrameFunctionalGroupsSequence);
const pixelBuffers = asList(seg.PixelData);
const packed = Buffer.concat(pixelBuffers.map((b) => Buffer.from(b)));
const shared = asList(seg.SharedFunctionalGroupsSequence)[0] || {};
const segments = {};
for (const description of asList(seg.SegmentSequence)) {
  segments[description.SegmentNumber] = {number: description.SegmentNumber, label: description.SegmentLabel,
    tracking_uid: description.TrackingUID || null, frames: 0, voxels: 0, sources: []};
}
frames.forEach((frame, index) => {
  const identification = asList(frame.SegmentIdentificationSequence || shared.SegmentIdentificationSequence)[0];
  const entry = segments[identification.ReferencedSegmentNumber];
  entry.frames += 1;
  const derivation = asList(frame.DerivationImageSequence)[0];
  entry.sources.push(asList(derivation.SourceImageSequence)[0].ReferencedSOPInstanceUID);
  let count = 0;
  for (let bit = index * frameBits; bit < (index + 1) * frameBits; bit++) {
    if (packed[bit >> 3] & (1 << (bit & 7))) count++;
  }
  entry.voxels += count;
});
process.stdout.write(JSON.stringify({segment_type: seg.SegmentationType, bits_allocated: seg.BitsAllocated,
  segments: Object.values(segments)}) + "\n");
