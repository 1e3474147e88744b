"""The ``search`` command's files: the chosen model (checked, validated, atomic), the report, the plots.

The winner is built again by :func:`onnxfactor.compress_file` with its rank file (the same
deterministic build as its evaluation), validated on the held-out data and written only after the
usual checks. With ``finetune`` (``--finetune``) the winner is then fine-tuned fully on the
calibration data (the candidates got the brief fine-tuning of ``brief_finetune``). Without a
feasible candidate nothing is written unless ``write_best``: then the closest candidate is, and
the command still exits 7.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from onnxfactor.report import to_jsonable
from onnxfactor.search.runner import SearchConfig, closest_candidate, infeasible, search


def search_file(model, output, calibration, held_out, *, config: SearchConfig, base, images=None, input_shapes=None,
                report_path=None, plots=None, write_best: bool = False, finetune=None, brief_finetune=None,
                progress=None, allow_overlap: bool = False) -> dict:
    """Run :func:`onnxfactor.search.search` and write its files; returns the report (a dict).

    Raises :class:`~onnxfactor.errors.ConstraintsNotMet` (exit 7) when no candidate meets the
    requirements, after writing the report, the plots and (``write_best``) the closest model.
    """
    from onnxfactor import io as model_io
    from onnxfactor.data import check_data_exists
    from onnxfactor.pipeline import compress_file
    from onnxfactor.validation.run import check_disjoint
    from onnxfactor.search.evaluate import config_for

    model, output = Path(model), Path(output)
    model_io.check_output_path(output, "output", protected={"input model": model})
    if report_path is not None:
        model_io.check_output_path(report_path, "report", protected={"input model": model, "output model": output})
    model_io.load_model(model)
    check_data_exists(calibration, role="calibration")
    check_data_exists(held_out.data, role="validation")
    if not allow_overlap:  # accuracy on the samples the factors were fitted to is not what users will see
        check_disjoint(model, calibration, images, base, held_out)
    result = search(model, calibration, held_out, config=config, base=base, images=images, input_shapes=input_shapes,
                    finetune=brief_finetune, progress=progress)
    report = to_jsonable(result.to_dict())
    chosen = result.winner or (closest_candidate(result.candidates) if write_best and result.candidates else None)
    try:
        if chosen is not None:
            with tempfile.TemporaryDirectory(prefix="onnxfactor-search-") as tmp:
                build = config_for(chosen["spec"], base, Path(tmp))
                final = compress_file(model, output, config=build, input_shapes=input_shapes,
                                      validation=dataclasses.replace(held_out, latency_runs=config.latency_runs, threads=config.threads),
                                      calibration=calibration if finetune is not None else result.statistics, images=images,
                                      allow_overlap=True, finetune=finetune)  # disjointness checked above
            report["output"] = {"path": str(output), "spec": chosen["spec"], "feasible": result.winner is not None,
                                "validation": final.validation, "conv_macs_ratio": final.totals.conv_macs_ratio,
                                "model_params_ratio": final.totals.model_params_ratio, "finetune": final.finetune}
        if plots is not None:
            from onnxfactor.search.plots import write_plots

            report["plots"] = [str(p) for p in write_plots(report, Path(plots))]
    finally:
        if report_path is not None:
            Path(report_path).write_text(json.dumps(report, indent=1) + "\n")
    if result.winner is None:
        raise infeasible(result, config.constraints)
    return report
