"""The Refine section: include / exclude points and a box placed on the slice views correct one segment, a step each
(CitrusVSlicerLib/refine*.py does the work)."""

import qt

import slicer
from slicer.i18n import tr as _

from CitrusVSlicerLib.endpoints import BackendError


class RefinePanel:
    """Correct a segment with points and a box; undo / redo, with the keyboard too while the module is shown.
    A mixin of CitrusVSlicerWidget (self.ui, self.logic, self._parameterNode, self.timer are the widget's)."""

    def setupRefine(self) -> None:
        """Include / exclude point lists and a box placed on any slice view; each placement is one step."""
        self.ui.refineStartButton.clicked.connect(self.onRefineStart)
        self.ui.refineUndoButton.clicked.connect(self.onRefineUndo)
        self.ui.refineRedoButton.clicked.connect(self.onRefineRedo)
        self.ui.refineClearButton.clicked.connect(self.onRefineClear)
        self.ui.refineSegmentComboBox.connect("activated(int)", lambda index: self.logic.stopRefine())
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   lambda node: self.updateRefineSegments())
        for widget in (self.ui.refineIncludePlaceWidget, self.ui.refineExcludePlaceWidget):
            widget.setPlaceModePersistency(True)
        self.updateRefineSegments()

    def updateRefineSegments(self) -> None:
        self.updateKeySliceSegments()
        combo = self.ui.refineSegmentComboBox
        current = combo.currentData
        combo.clear()
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentation is not None:
            for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
                segment = segmentation.GetSegmentation().GetNthSegment(index)
                combo.addItem(segment.GetName(), segmentation.GetSegmentation().GetNthSegmentID(index))
        found = combo.findData(current) if current else -1
        combo.setCurrentIndex(found if found >= 0 else 0)

    def onRefineStart(self) -> None:
        node = self._parameterNode
        segmentation, segmentId = node.outputSegmentation, self.ui.refineSegmentComboBox.currentData
        if not node.inputVolume or segmentation is None or not segmentId:
            self.setRefineStatus(_("Segment the volume first (Apply), then pick the segment to correct."), True)
            return
        try:
            target = self.currentTarget()
            if self.logic.backend.needs_consent(target) and not self.askConsent(target.url):
                self.setRefineStatus(_("Cancelled: no image data was sent."))
                return
            refinement = self.logic.startRefine(target, node.inputVolume, segmentation, segmentId,
                                                self.logic.taskOptions(node),
                                                {"propagate": node.refinePropagate, "keep_text": node.refineKeepText},
                                                self.setRefineStatus)
        except (BackendError, ValueError) as error:
            self.setRefineStatus(str(error), True)
            return
        self.ui.refineIncludePlaceWidget.setCurrentNode(refinement.include)
        self.ui.refineExcludePlaceWidget.setCurrentNode(refinement.exclude)
        self.ui.refineBoxPlaceWidget.setCurrentNode(refinement.box)
        self.timer.start(0)

    def onRefineUndo(self) -> None:
        if self.logic.refinement is not None:
            self.logic.refinement.undo()
            self.timer.start(0)

    def onRefineRedo(self) -> None:
        if self.logic.refinement is not None:
            self.logic.refinement.redo()
            self.timer.start(0)

    def onRefineClear(self) -> None:
        for widget in (self.ui.refineIncludePlaceWidget, self.ui.refineExcludePlaceWidget, self.ui.refineBoxPlaceWidget):
            markups = widget.currentNode()
            if markups is not None:
                markups.RemoveAllControlPoints()

    def setRefineStatus(self, text: str, error: bool = False) -> None:
        self.ui.refineStatusLabel.text = text
        self.ui.refineStatusLabel.setStyleSheet("color: #c0392b" if error else "")

    def installRefineShortcuts(self) -> None:
        """Ctrl+Z / Ctrl+Y (Ctrl+Shift+Z) while this module is shown: one refinement, one step (as the Segment
        Editor installs its own while it is shown)."""
        if self._refineShortcuts:
            return
        for sequence, slot in ((qt.QKeySequence.Undo, self.onRefineUndo), (qt.QKeySequence.Redo, self.onRefineRedo),
                               ("Ctrl+Y", self.onRefineRedo)):
            shortcut = qt.QShortcut(qt.QKeySequence(sequence), slicer.util.mainWindow())
            shortcut.connect("activated()", slot)
            self._refineShortcuts.append(shortcut)

    def removeRefineShortcuts(self) -> None:
        for shortcut in self._refineShortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._refineShortcuts = []
