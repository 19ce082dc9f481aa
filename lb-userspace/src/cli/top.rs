//! `sluice top`: a live view of services and backends — open / max_conns with a saturation
//! bar, new flows/s, refusals/s by reason, state — and the alerts firing. Polls the daemon's
//! status every second; `q` or Esc quits.

use std::{collections::BTreeMap, path::Path, time::Duration};

use crate::{
    api::StatusReport,
    client::{self, Client},
    out, Error,
};
use crossterm::{
    event::{self, Event, KeyCode},
    execute,
    terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{
    backend::{Backend, CrosstermBackend},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table},
    Terminal,
};

/// Per-backend rates between two status samples.
#[derive(Default)]
pub struct Rates {
    prev: BTreeMap<String, (u64, BTreeMap<String, u64>)>,
}

fn bar(ratio: f64, width: usize) -> String {
    let filled = ((ratio.clamp(0.0, 1.0)) * width as f64).round() as usize;
    format!("{}{}", "█".repeat(filled), "·".repeat(width - filled))
}

/// Draws one frame from a `/v1/status` document (`secs` since the previous one).
pub fn draw<B: Backend>(term: &mut Terminal<B>, status: &StatusReport, rates: &mut Rates, secs: f64) -> std::io::Result<()> {
    let mut rows = Vec::new();
    let mut next = BTreeMap::new();
    for s in &status.services {
        for b in &s.backends {
            let key = format!("{}/{}", s.name, b.address);
            let (open, max) = (b.open, u64::from(b.max_conns));
            let ratio = if max == 0 { 1.0 } else { open as f64 / max as f64 };
            let (new_flows, refused) = (b.new_flows, b.refused.clone());
            let (flows_s, refused_s) = match rates.prev.get(&key) {
                Some((pf, pr)) if secs > 0.0 => {
                    let fs = new_flows.saturating_sub(*pf) as f64 / secs;
                    let rs: Vec<String> = refused
                        .iter()
                        .filter_map(|(r, n)| {
                            let d = n.saturating_sub(pr.get(r).copied().unwrap_or(*n));
                            (d > 0).then(|| format!("{r} {:.1}/s", d as f64 / secs))
                        })
                        .collect();
                    (format!("{fs:.1}"), rs.join(", "))
                }
                _ => ("-".into(), String::new()),
            };
            next.insert(key, (new_flows, refused));
            let style = if ratio >= 1.0 {
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
            } else if ratio >= 0.8 {
                Style::default().fg(Color::Yellow)
            } else {
                Style::default()
            };
            rows.push(
                Row::new(vec![
                    s.name.clone(),
                    b.address.to_string(),
                    b.state.clone(),
                    format!("{open}/{max}"),
                    format!("{} {:>3.0}%", bar(ratio, 20), ratio * 100.0),
                    flows_s,
                    refused_s,
                ])
                .style(style),
            );
        }
    }
    rates.prev = next;
    let alerts: Vec<Line> = status.alerts_firing.iter().map(|a| Line::styled(format!("{} [{}] {}", a.alertname, a.severity, a.summary), Style::default().fg(Color::Red))).collect();
    let title = format!(" sluice top — {} — {} flows of {} — q quits ", status.interface, status.flows, status.flow_capacity);
    term.draw(|f| {
        let [top, bottom] = Layout::vertical([Constraint::Min(5), Constraint::Length(8)]).areas(f.area());
        let header = Row::new(["SERVICE", "BACKEND", "STATE", "OPEN/MAX", "SATURATION", "NEW/S", "REFUSED/S"]).style(Style::default().add_modifier(Modifier::BOLD));
        let widths =
            [Constraint::Length(12), Constraint::Length(18), Constraint::Length(9), Constraint::Length(11), Constraint::Length(26), Constraint::Length(7), Constraint::Min(10)];
        f.render_widget(Table::new(rows, widths).header(header).block(Block::default().borders(Borders::ALL).title(title)), top);
        let body = if alerts.is_empty() { vec![Line::raw("no alerts firing")] } else { alerts };
        f.render_widget(Paragraph::new(body).block(Block::default().borders(Borders::ALL).title(" alerts firing ")), bottom);
    })?;
    Ok(())
}

#[derive(clap::Args)]
pub struct Args {
    /// Print one frame as plain text and exit (two samples a second apart, so rates show):
    /// for scripts, tickets and terminals without a TTY.
    #[arg(long)]
    pub once: bool,
    /// Width of the `--once` frame, in columns.
    #[arg(long, default_value_t = 120, requires = "once")]
    pub width: u16,
}

/// One frame as text lines (trailing blanks trimmed).
fn render_once(status: &[StatusReport; 2], width: u16) -> std::io::Result<String> {
    let rows = status[1].services.iter().map(|s| s.backends.len()).sum::<usize>();
    let alerts = status[1].alerts_firing.len();
    let height = u16::try_from(rows + 4 + alerts.max(1) + 2).unwrap_or(u16::MAX).max(13);
    let mut term = Terminal::new(ratatui::backend::TestBackend::new(width, height))?;
    let mut rates = Rates::default();
    draw(&mut term, &status[0], &mut rates, 1.0)?;
    draw(&mut term, &status[1], &mut rates, 1.0)?;
    let buf = term.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

pub fn run(socket: &Path, a: &Args) -> Result<(), Error> {
    let daemon = Client::new(socket);
    if a.once {
        return client::block_on(async {
            let first = daemon.status().await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let second = daemon.status().await?;
            out!("{}", render_once(&[first, second], a.width).map_err(|e| Error::other("drawing", e))?);
            Ok(())
        });
    }
    client::block_on(async {
        // Fail before touching the terminal if the daemon is not there.
        let mut status = daemon.status().await?;
        enable_raw_mode().map_err(|e| Error::other("terminal", e))?;
        let mut out = std::io::stdout();
        execute!(out, EnterAlternateScreen).map_err(|e| Error::other("terminal", e))?;
        let mut term = Terminal::new(CrosstermBackend::new(out)).map_err(|e| Error::other("terminal", e))?;
        let mut rates = Rates::default();
        let result = loop {
            if let Err(e) = draw(&mut term, &status, &mut rates, 1.0) {
                break Err(Error::other("drawing", e));
            }
            if event::poll(Duration::from_secs(1)).unwrap_or(false) {
                if let Ok(Event::Key(k)) = event::read() {
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        break Ok(());
                    }
                }
            }
            match daemon.status().await {
                Ok(s) => status = s,
                Err(e) => break Err(e),
            }
        };
        let _ = disable_raw_mode();
        let _ = execute!(term.backend_mut(), LeaveAlternateScreen);
        result
    })
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;

    use super::*;

    #[test]
    fn renders_saturation_rates_and_alerts() {
        let status = |flows: u64, refused: u64| -> StatusReport {
            let backend = |address: &str, state: &str, open: u64, max_conns: u32, new_flows: u64, refused: serde_json::Value| {
                serde_json::json!({ "address": address, "id": 0, "state": state, "open": open, "max_conns": max_conns, "limit": max_conns,
                    "weight": 1, "removed": false, "new_flows": new_flows, "refused": refused })
            };
            serde_json::from_value(serde_json::json!({
                "interface": "eth0", "config": "/etc/sluice/sluice.toml", "flows": 12, "flow_capacity": 1000,
                "services": [{ "name": "web", "vip": "10.0.0.1", "port": 80, "proto": "tcp", "mode": "l2dsr", "backends": [
                    backend("10.0.0.11", "active", 5, 5, flows, serde_json::json!({ "backend_limit": refused })),
                    backend("10.0.0.12", "draining", 1, 10, 0, serde_json::json!({})),
                ]}],
                "last_sweep": { "scanned": 0, "expired": 0, "released": 0 }, "last_drift": [], "drift_corrected": 0, "break_glass": [],
                "outcomes": { "outcomes": [], "total_packets": 0, "total_bytes": 0 },
                "alerts_firing": [{ "status": "firing", "alertname": "SluiceBackendAtLimit", "severity": "critical", "labels": {}, "description": "", "runbook_url": "",
                    "summary": "Sluice load balancer lb-1: backend 10.0.0.11 of service \"web\" is at its connection limit (5 of 5 open)" }]
            }))
            .expect("a status report")
        };
        let mut term = Terminal::new(TestBackend::new(140, 20)).expect("terminal");
        let mut rates = Rates::default();
        draw(&mut term, &status(10, 0), &mut rates, 1.0).expect("draw");
        draw(&mut term, &status(14, 6), &mut rates, 2.0).expect("draw");
        let text: String = term.backend().buffer().content().iter().map(ratatui::buffer::Cell::symbol).collect();
        assert!(text.contains("10.0.0.11") && text.contains("5/5") && text.contains("100%"), "{text}");
        assert!(text.contains("2.0") && text.contains("backend_limit 3.0/s"), "rates over 2 s: {text}");
        assert!(text.contains("draining") && text.contains("SluiceBackendAtLimit"), "{text}");
        let once = render_once(&[status(10, 0), status(12, 1)], 140).expect("once");
        assert!(once.lines().any(|l| l.contains("10.0.0.11") && l.contains("5/5") && l.contains("backend_limit 1.0/s")), "{once}");
        assert!(once.lines().all(|l| l == l.trim_end()), "trailing blanks trimmed");
    }
}
