"""Paper Table 1 as CSV, Markdown and picture (rule table1)."""

from blurflow import evaluate, figures, logs
from blurflow.data import ShardDataset

log = logs.job(snakemake)
rows = evaluate.table1_rows(snakemake.input.testset, snakemake.input.predictions, snakemake.input.fits)
rows.to_csv(snakemake.output.csv, index=False)
for row in rows.itertuples():
    truth = ", ".join(f"{getattr(row, c):.2f}" for c in evaluate.COMPONENTS)
    pred = ", ".join(f"{getattr(row, 'pred_' + c):.2f}" for c in evaluate.COMPONENTS)
    fit = ", ".join(f"{getattr(row, 'fit_' + c):.2f}" for c in evaluate.COMPONENTS)
    log.info(
        "Table 1 case %s (%s, %d images): truth (%s), network (%s), fit of %d beads (%s)", row.case, row.source, row.images, truth, pred, row.beads_fitted, fit
    )
with open(snakemake.output.md, "w") as f:
    f.write(rows.to_markdown(index=False, floatfmt=".2f") + "\n")
ds = ShardDataset([snakemake.input.testset])
first = [ds.attrs["cases"].index(case) for case in rows["case"]]
thumbnails = [ds[i]["image"][0].numpy() for i in first]
figures.table1_image(rows, thumbnails).savefig(snakemake.output.figure, dpi=110)
