"""The report task of `VolumePipeline` (a mixin): the reference's chest-radiograph prompt on spread slices or on a
radiograph-like projection; experimental either way."""
from __future__ import annotations

from .results import VolumeResult
from .sampling import spread


# The reference's report prompt, verbatim (demo/citrusv_streamlit_app.py, the "Report" example).
REPORT_PROMPT = "Evaluate the provided chest radiograph and compile a report. Let's think step by step."
REPORT_EXPERIMENTAL = ("EXPERIMENTAL: Citrus-V's reports were trained and benchmarked on chest radiographs (CheXpert "
                       "Plus), not on {what}; findings may be invented. Read the images yourself.")


class ReportTask:
    def _run_report(self, source, prompt, options, slice_range, result: VolumeResult):
        """The reference's chest-radiograph prompt (unless the user gives one) on spread slices, or on a
        radiograph-like projection of the volume; experimental either way (trained on chest X-rays)."""
        budget = self._budget("report", options)
        query = prompt.strip() if prompt and prompt.strip() else REPORT_PROMPT
        result.settings["report_prompt"] = query
        result.settings["report_image"] = options.report_image
        if options.report_image == "projection":
            from ..slices.projection import radiograph_projection

            result.experimental = REPORT_EXPERIMENTAL.format(what="projections of CT volumes")
            result.report_image = radiograph_projection(source.volume)
            images = [("projection", result.report_image)]
        else:
            what = f"{source.volume.modality} slices"
            result.experimental = REPORT_EXPERIMENTAL.format(what=what) + \
                (" For a chest CT, --report-image projection shows the model a radiograph-like image."
                 if source.volume.modality.upper() == "CT" else "")
            images = [(index, None) for index in spread(*slice_range, options.report_slices)]
        findings_text, impression_text = [], []
        for done, (where, image) in enumerate(images, start=1):
            self._check_cancel()
            answer = self.engine.run(source.gray(where) if image is None else image, query, task="report",
                                     min_pixels=budget.min_pixels, max_pixels=budget.max_pixels,
                                     max_new_tokens=options.max_new_tokens)
            label = "projection" if image is not None else f"slice {where}"
            report = answer.report
            if report is not None:
                if report.findings_text:
                    findings_text.append(f"[{label}] {report.findings_text}")
                if report.impression_text:
                    impression_text.append(f"[{label}] {report.impression_text}")
                for finding in report.findings:
                    result.findings.append({"finding": finding.text, "location": finding.location or "",
                                            "laterality": finding.laterality or "", "negated": finding.negated,
                                            "slice": where if image is None else None, "segment": ""})
            result.problems.extend(f"{label}: {p}" for p in answer.problems)
            self.progress("report", done / len(images), f"{label} read")
        result.report_findings = "\n".join(findings_text)
        result.report_impression = "\n".join(impression_text)
