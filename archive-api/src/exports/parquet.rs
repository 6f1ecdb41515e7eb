//! A Parquet job's output: one zstd Parquet file per table (`<id>/<table>.parquet`), written
//! from the table's rows in stages (read, then de-identified and scanned by worker threads,
//! then encoded), with each file's rows, size, SHA-256, columns and removed columns for the
//! manifest.

use super::cohort::{fan_out, Cohort};
use super::output::ParquetOut;
use super::{shifted, Failure, Run, Watch};
use serde_json::{json, Value};
use std::sync::Arc;
use strata_deidentify::Scanner;

impl Run<'_> {
    /// Every table of a Parquet job: `<id>/<table>.parquet`. Returns the files' entries.
    pub(crate) async fn parquet_files(
        &self,
        scanner: &mut Scanner,
        watch: &mut Watch<'_>,
    ) -> Result<Vec<Value>, Failure> {
        let Run {
            exporter,
            state,
            id,
            spec,
            profile,
            ctx,
            ref members,
        } = *self;
        let mut files = Vec::new();
        for (n, table) in spec.tables.iter().enumerate() {
            let _ = state
                .control
                .export_progress(
                    id,
                    &format!("table {} of {}: {table}", n + 1, spec.tables.len()),
                )
                .await;
            let Some((plan, mut rows)) = exporter
                .plan(&state.archive.view(), table, spec, profile)
                .await?
            else {
                continue;
            };
            let cohort = Cohort::new(spec, table, members.clone(), shifted(profile, ctx));
            rows.project(
                plan.input_columns()
                    .into_iter()
                    .chain(cohort.columns().map(str::to_string)),
            );
            let name = format!("{table}.parquet");
            let mut out = ParquetOut::new(
                &exporter.store,
                &format!("{id}/{name}"),
                plan.output_schema(),
            )?;
            let plan = Arc::new(plan);
            let (worker_plan, worker_ctx, file) = (plan.clone(), ctx.clone(), name.clone());
            let columns = plan.scan_columns();
            let (mut made, workers) = fan_out(
                rows,
                plan.clone(),
                cohort,
                profile.years_only(),
                move |batch, scanner| {
                    let out = worker_plan
                        .apply(batch, &worker_ctx)
                        .map_err(|e| e.to_string())?;
                    let (patients, keys) = worker_plan.row_keys(batch);
                    scanner.key_copies(&file, &out, &columns, &patients, &keys);
                    scanner.batch(&file, &out, &columns);
                    Ok(out)
                },
            );
            let mut exported = 0u64;
            while let Some(out_batch) = made.recv().await {
                watch.check().await?;
                let out_batch = out_batch?;
                out.write(&out_batch).await?;
                exported += out_batch.num_rows() as u64;
            }
            for w in workers {
                scanner.merge(w.await.map_err(|e| e.to_string())?);
            }
            let written = out.finish().await?;
            files.push(json!({
                "table": table,
                "file": name,
                "rows": exported,
                "bytes": written.bytes,
                "sha256": written.sha256,
                "columns": plan.columns.iter().map(|c| json!({
                    "name": c.name, "source": c.source, "class": c.class, "action": c.action,
                })).collect::<Vec<_>>(),
                "removed": plan.removed.iter().map(|(c, why)| json!({ "column": c, "reason": why })).collect::<Vec<_>>(),
            }));
        }
        Ok(files)
    }
}
