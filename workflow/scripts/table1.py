"""Paper Table 1 as CSV, Markdown and picture (rule table1)."""

from blurflow import evaluate, figures, logs
from blurflow.data import ShardDataset

logs.to_file(snakemake.log[0])
rows = evaluate.table1_rows(snakemake.input.testset, snakemake.input.predictions)
rows.to_csv(snakemake.output.csv, index=False)
with open(snakemake.output.md, "w") as f:
    f.write(rows.to_markdown(index=False, floatfmt=".2f") + "\n")
ds = ShardDataset([snakemake.input.testset])
first = [ds.attrs["cases"].index(case) for case in rows["case"]]
thumbnails = [ds[i]["image"][0].numpy() for i in first]
figures.table1_image(rows, thumbnails).savefig(snakemake.output.figure, dpi=110)
