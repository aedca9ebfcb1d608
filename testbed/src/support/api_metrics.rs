//! The API server's own request counters (`apiserver_request_total` on its
//! `/metrics`): what tests and benchmarks count API requests with.

use std::collections::BTreeMap;

use crate::Result;

/// One series of `apiserver_request_total`: its labels and its count.
#[derive(Clone, Debug)]
pub struct Requests {
    pub labels: BTreeMap<String, String>,
    pub count: u64,
}

impl Requests {
    /// Whether label `name` is `value`.
    pub fn is(&self, name: &str, value: &str) -> bool {
        self.labels.get(name).map(String::as_str) == Some(value)
    }
}

/// Every series of `apiserver_request_total` as the API server counts now.
pub async fn requests(client: &kube::Client) -> Result<Vec<Requests>> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a GET of a fixed path is a valid request");
    let text = client.request_text(req).await?;
    Ok(parse(&text))
}

/// The sum of the counts of the series `keep` selects.
pub async fn count(client: &kube::Client, keep: impl Fn(&Requests) -> bool) -> Result<u64> {
    Ok(requests(client)
        .await?
        .iter()
        .filter(|r| keep(r))
        .map(|r| r.count)
        .sum())
}

fn parse(text: &str) -> Vec<Requests> {
    text.lines()
        .filter_map(|l| l.strip_prefix("apiserver_request_total{"))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some(Requests {
                labels,
                count: value.trim().parse::<f64>().ok()? as u64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn series_are_read_with_their_labels() {
        let text = "# HELP apiserver_request_total x\n\
            apiserver_request_total{code=\"404\",component=\"apiserver\",resource=\"nodeimagesets\",subresource=\"status\",verb=\"APPLY\"} 3\n\
            apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"LIST\"} 1.2e+02\n\
            apiserver_request_duration_seconds_count{verb=\"GET\"} 9\n";
        let r = super::parse(text);
        assert_eq!(r.len(), 2);
        assert!(r[0].is("code", "404") && r[0].is("subresource", "status"));
        assert_eq!(r[0].count, 3);
        assert!(r[1].is("resource", "pods"));
        assert_eq!(r[1].count, 120);
    }
}
