"""The Conversation section: questions about the slice a view shows, the history kept in the scene
(CitrusVSlicerLib/conversation*.py does the work)."""

from pathlib import Path

import qt

import slicer
from slicer.i18n import tr as _

from CitrusVSlicerLib.conversation import history_markdown, turn_details, turn_title
from CitrusVSlicerLib.conversation_scene import (CONVERSATION_ATTRIBUTE, create_history, histories_of, history_volume,
                                                 jump_to_turn, propagation_question, question_for, read_history)
from CitrusVSlicerLib.endpoints import BackendError
from CitrusVSlicerLib.view_slice import ViewNotAligned


class ConversationPanel:
    """Ask, list, revisit, propagate and export the turns of the conversation the panel shows.
    A mixin of CitrusVSlicerWidget (self.ui, self.logic, self._parameterNode, self.timer are the widget's)."""

    def setupConversation(self) -> None:
        """Questions about the slice a view shows; the history lives in the scene (CitrusVSlicerLib/conversation*)."""
        self.ui.conversationSelector.addAttribute("vtkMRMLTextNode", CONVERSATION_ATTRIBUTE, "1")
        self.ui.conversationSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.showConversation())
        self.ui.conversationNewButton.clicked.connect(self.onConversationNew)
        self.ui.conversationAskButton.clicked.connect(self.onConversationAsk)
        self.ui.conversationPromptLineEdit.returnPressed.connect(self.onConversationAsk)
        self.ui.conversationCancelButton.clicked.connect(self.onConversationCancel)
        self.ui.conversationTurnsListWidget.connect("currentRowChanged(int)", self.onConversationTurnSelected)
        self.ui.conversationPropagateButton.clicked.connect(self.onConversationPropagate)
        self.ui.conversationExportButton.clicked.connect(self.onConversationExport)

    def conversationTurns(self) -> list:
        """The shown conversation's turns, parsed again only when its node changed (the timer asks every tick)."""
        history = self._parameterNode.conversation if self._parameterNode else None
        if history is None:
            return []
        key = (history.GetID(), history.GetMTime())
        if self._conversationCache[0] != key:
            try:
                self._conversationCache = (key, read_history(history)["turns"])
            except ValueError:
                self._conversationCache = (key, [])
        return self._conversationCache[1]

    def selectedTurn(self):
        turns = self.conversationTurns()
        row = self.ui.conversationTurnsListWidget.currentRow
        return turns[row] if 0 <= row < len(turns) else None

    def updateConversationButtons(self, ready: bool) -> None:
        asking = self.logic.asking
        self.ui.conversationAskButton.enabled = ready and not asking
        self.ui.conversationCancelButton.enabled = asking
        turn = self.selectedTurn()
        made_segment = turn is not None and any(s.get("found") for s in turn.get("segments", []))
        self.ui.conversationPropagateButton.enabled = ready and not asking and made_segment
        self.ui.conversationExportButton.enabled = bool(self.conversationTurns())

    def setConversationStatus(self, text: str, error: bool = False) -> None:
        self.ui.conversationStatusLabel.text = text
        self.ui.conversationStatusLabel.setStyleSheet("color: #c0392b" if error else "")

    def showConversation(self, select: int = -1) -> None:
        """List the shown conversation's turns (without moving the views), the last or `select`-th one selected."""
        turns = self.conversationTurns()
        listWidget = self.ui.conversationTurnsListWidget
        listWidget.blockSignals(True)
        listWidget.clear()
        for turn in turns:
            listWidget.addItem(turn_title(turn))
        row = select if 0 <= select < len(turns) else len(turns) - 1
        listWidget.setCurrentRow(row)
        listWidget.blockSignals(False)
        self.ui.conversationDetailsTextEdit.setPlainText(turn_details(turns[row]) if turns else "")

    def onConversationNew(self) -> None:
        node = self._parameterNode
        if not node or not node.inputVolume:
            self.setConversationStatus(_("Choose an input volume."), error=True)
            return
        node.conversation = create_history(slicer.mrmlScene, node.inputVolume)
        self.setConversationStatus(_("New conversation: the model will not see the earlier ones."))

    def onConversationAsk(self) -> None:
        node = self._parameterNode
        if self.logic.asking or not node:
            return
        if not node.inputVolume:
            self.setConversationStatus(_("Choose an input volume."), error=True)
            return
        try:
            question = question_for(slicer.mrmlScene, node.inputVolume, node.conversationView,
                                    self.ui.conversationPromptLineEdit.text, node.window, node.conversationRoi)
        except ValueError as error:  # ViewNotAligned too: its message says what to do
            self.setConversationStatus(str(error), error=True)
            return
        self.askConversation(question)

    def askConversation(self, question) -> None:
        node = self._parameterNode
        try:
            target = self.currentTarget()
            if self.logic.backend.needs_consent(target) and not self.askConsent(target.url):
                self.setConversationStatus(_("Cancelled: no image data was sent."))
                return
            history = node.conversation
            if history is None or history_volume(history) is not node.inputVolume:  # the volume's latest, or a new one
                earlier = histories_of(slicer.mrmlScene, node.inputVolume)
                history = earlier[-1] if earlier else create_history(slicer.mrmlScene, node.inputVolume)
                node.conversation = history
            self.logic.startAsk(target, node.inputVolume, history, question)
        except (BackendError, ValueError) as error:
            self.setConversationStatus(str(error), error=True)
            return
        self.ui.conversationProgressBar.value = 0
        self.setConversationStatus(_("Asking about {axis} slice {index}...").format(axis=question.axis,
                                                                                  index=question.slice))
        self.timer.start(0)
        self.updateGui()

    def onConversationCancel(self) -> None:
        self.logic.cancelAsk()
        self.setConversationStatus(_("Cancelling..."))

    def onConversationEvent(self, event) -> None:
        if event.kind == "progress":
            self.ui.conversationProgressBar.value = int(100 * event.fraction)
            self.setConversationStatus(f"{event.stage}: {event.message}" if event.message else event.stage)
        elif event.kind == "done":
            turn = event.written["turn"]
            self.ui.conversationProgressBar.value = 100
            self.ui.conversationPromptLineEdit.text = ""
            self.showConversation()
            self.setConversationStatus(turn_title(turn))
        else:
            self.ui.conversationProgressBar.value = 0
            self.setConversationStatus(_("Cancelled.") if event.message == "cancelled" else event.message,
                                       error=event.kind == "error")

    def onConversationTurnSelected(self, row: int) -> None:
        turn = self.selectedTurn()
        if turn is None:
            return
        self.ui.conversationDetailsTextEdit.setPlainText(turn_details(turn))
        volume = history_volume(self._parameterNode.conversation)  # selectedTurn found one: the node is there
        if volume is not None:
            try:
                jump_to_turn(slicer.mrmlScene, volume, turn)
            except ViewNotAligned as error:
                self.setConversationStatus(str(error), error=True)
        self.updateGui()

    def onConversationPropagate(self) -> None:
        turn = self.selectedTurn()
        if turn is not None and not self.logic.asking:
            self.askConversation(propagation_question(turn))

    def onConversationExport(self) -> None:
        history = self._parameterNode.conversation if self._parameterNode else None
        if history is None:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export the conversation"),
                                              history.GetName() + ".md", "Markdown (*.md)")
        if path:
            volume = history_volume(history)
            Path(path).write_text(history_markdown(read_history(history), volume.GetName() if volume else ""),
                                  encoding="utf-8")
            self.setConversationStatus(_("Conversation saved to {path}.").format(path=path))
