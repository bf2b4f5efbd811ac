"""The Results section's evidence and export: jump to a segment's key slice, export the scene's segments to DICOM."""

import qt

import slicer
from slicer.i18n import tr as _

from CitrusVSlicerLib.endpoints import BackendError
from CitrusVSlicerLib.key_slice import jump_to_key_slice, segment_evidence
from CitrusVSlicerLib.scene_export import export_summary, source_volume


class ResultsPanel:
    """Where each segment's key slice is, and the DICOM export of what the scene holds now.
    A mixin of CitrusVSlicerWidget (self.ui, self.logic, self._parameterNode, self.timer are the widget's)."""

    def updateKeySliceSegments(self) -> None:
        """The output segmentation's segments that have a key slice, with their evidence as tooltips."""
        combo = self.ui.resultsKeySliceComboBox
        combo.clear()
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentation is None:
            return
        for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
            segment = segmentation.GetSegmentation().GetNthSegment(index)
            evidence = segment_evidence(segment)
            if evidence["key_slice"] is None:
                continue
            combo.addItem(f"{segment.GetName()} (slice {evidence['key_slice']})",
                          segmentation.GetSegmentation().GetNthSegmentID(index))
            tip = _("key slice {k} ({axis}), score {score}").format(
                k=evidence["key_slice"], axis=evidence["axis"],
                score="-" if evidence["score"] is None else f"{evidence['score']:.3g}")
            combo.setItemData(combo.count - 1, tip + ("\n" + evidence["answer"] if evidence["answer"] else ""),
                              qt.Qt.ToolTipRole)

    def onJumpToKeySlice(self) -> None:
        node = self._parameterNode
        segmentId = self.ui.resultsKeySliceComboBox.currentData
        if node is None or node.outputSegmentation is None or not segmentId or not node.inputVolume:
            return
        try:  # on the volume the segmentation was made on
            jump_to_key_slice(slicer.mrmlScene, source_volume(node.outputSegmentation, node.inputVolume),
                              node.outputSegmentation, segmentId)
        except ValueError as error:
            self.setStatus(str(error), error=True)

    def onExportDicom(self) -> None:
        node = self._parameterNode
        self.setStatus(_("Exporting the segments as they are in the scene to DICOM..."))
        try:
            self.logic.exportDicom(self.currentTarget(), node.inputVolume if node else None,
                                   node.outputSegmentation if node else None, self.onExportDicomDone)
        except BackendError as error:
            self.setStatus(_("DICOM export refused: ") + str(error), error=True)
            return
        self.timer.start(0)

    def onExportDicomDone(self, done, error) -> None:
        if error is not None:
            self.setStatus(_("DICOM export refused: ") + str(error), error=True)
            return
        self.setStatus(export_summary(done))
