//! `strata exports check`: what each export profile lets out, class by class and, for every
//! archived table, column by column — and what a site's profile lets out beyond Safe Harbor.

use crate::context::Context;
use anyhow::{Context as _, Result};
use std::fmt::Write;
use strata_deidentify::{merge_schemas, Classification, Profile, TablePlan};

/// The report for `profile` (or every profile): printed text.
pub async fn check(ctx: &Context, only: Option<&str>) -> Result<String> {
    let loaded = &ctx.config;
    let classes: Classification = loaded.classification()?;
    let mut profiles: Vec<Profile> = vec![Profile::safe_harbor(), Profile::limited_data_set()];
    if let Some(exports) = loaded.api.as_ref().and_then(|a| a.exports.as_ref()) {
        for (name, p) in &exports.profiles {
            profiles.push(
                p.build(name)
                    .map_err(|e| anyhow::anyhow!("{}", e.join("\n")))?,
            );
        }
    }
    if let Some(name) = only {
        profiles.retain(|p| p.name == name);
        if profiles.is_empty() {
            anyhow::bail!("no export profile {name:?}");
        }
    }
    let archive = ctx.archive().await.context("opening the archive")?;
    // Each table's archived schema, merged over its files.
    let mut schemas = Vec::new();
    for (table, manifests) in &archive.catalog().tables {
        let mut of_table = Vec::new();
        for f in manifests.iter().flat_map(|m| &m.files) {
            of_table.push(archive.file_schema(f).await?);
        }
        schemas.push((
            table.clone(),
            merge_schemas(&of_table).map_err(anyhow::Error::msg)?,
        ));
    }
    let safe_harbor = Profile::safe_harbor();
    let mut out = String::new();
    for p in &profiles {
        let kind = if p.built_in { "built in" } else { "the site's" };
        let _ = writeln!(
            out,
            "profile {} ({kind}){}",
            p.name,
            if p.requires_dua {
                ", needs a data use agreement"
            } else {
                ""
            }
        );
        for (class, action) in p.lets_out() {
            let item = class
                .safe_harbor_item()
                .map(|i| format!("  [{i}]"))
                .unwrap_or_default();
            let _ = writeln!(out, "  lets out {class}: {action}{item}");
        }
        if !p.built_in {
            let beyond = p.beyond(&safe_harbor);
            if beyond.is_empty() {
                let _ = writeln!(out, "  lets out nothing beyond safe_harbor");
            }
            for (class, mine, theirs) in beyond {
                let _ = writeln!(
                    out,
                    "  WARNING beyond safe_harbor: {class} leaves as {mine} (safe_harbor: {theirs})"
                );
            }
        }
        for (table, schema) in &schemas {
            if !p.tables.is_empty() && !p.tables.contains(table) {
                continue;
            }
            let plan = TablePlan::new(table, schema.clone(), &classes.table(table), p, None)
                .map_err(anyhow::Error::msg)?;
            let _ = writeln!(out, "  table {table}:");
            for c in &plan.columns {
                let _ = writeln!(
                    out,
                    "    {} <- {} ({}, {})",
                    c.name, c.source, c.class, c.action
                );
            }
            for (column, why) in &plan.removed {
                let _ = writeln!(out, "    removed {column}: {why}");
            }
        }
    }
    Ok(out)
}
