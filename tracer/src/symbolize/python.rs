//! Python frames in a native stack: each recorded frame resolved to a
//! report frame, and the frames of each C-level eval call put in place of
//! the native eval frame that ran them.

use super::*;

/// The native frame that runs Python frames in CPython 3.8-3.13.
pub(super) const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

/// The report frame for a Python [`NormFrame`]. A frame that could not be
/// read stays a native-kind placeholder with the reason: never a guess.
pub(super) fn python_frame(f: &NormFrame) -> Frame {
    let mut frame = Frame::marker(String::new(), None);
    frame.function = None;
    match f {
        NormFrame::Python {
            function,
            file,
            line,
            ..
        } => {
            frame.function = Some(function.clone());
            frame.file = Some(file.clone());
            frame.line = *line;
            frame.kind = FrameKind::Python;
        }
        NormFrame::PythonUnreadable { code, reason, .. } => {
            frame.function = Some(format!("[python frame: {reason}]"));
            frame.offset = Some(*code);
        }
        NormFrame::PythonTruncated(why) => {
            frame.function = Some(format!(
                "[python stack truncated: {}]",
                match *why {
                    py_stop::DEPTH => "deeper than the frame limit",
                    _ => "interpreter memory unreadable",
                }
            ));
        }
        _ => {}
    }
    frame
}

/// Put Python frames (innermost first, with their `is_entry` flags) in
/// place of the native eval-loop frames that ran them.
///
/// Each C-level call of `_PyEval_EvalFrameDefault` runs the Python frames
/// from one entry frame inwards (3.11+ run Python-to-Python calls in the
/// same C call; 3.8-3.10 make every frame an entry frame), so group `k`
/// (ending at the `k`-th entry frame) replaces the `k`-th eval frame.
/// When the counts disagree (a native walk cut short, an entry flag
/// unread) every Python frame goes in place of the
/// innermost eval frame and the other eval frames are dropped: the order
/// of the Python frames is still right, only their interleaving with C
/// frames between eval calls is lost. Without any eval frame (its symbol
/// unknown) they go after the native frames. `tail` (a truncation marker)
/// follows the outermost Python frame.
pub fn merge_python(
    native: Vec<Frame>,
    python: Vec<(Frame, bool)>,
    tail: Option<Frame>,
) -> Vec<Frame> {
    if python.is_empty() && tail.is_none() {
        return native;
    }
    let mut groups: Vec<Vec<Frame>> = Vec::new();
    let mut cur = Vec::new();
    for (f, entry) in python {
        cur.push(f);
        if entry {
            groups.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        groups.push(cur);
    }
    if let Some(t) = tail {
        match groups.last_mut() {
            Some(g) => g.push(t),
            None => groups.push(vec![t]),
        }
    }
    let evals: Vec<usize> = native
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.inlined && f.function.as_deref() == Some(EVAL_FRAME))
        .map(|(i, _)| i)
        .collect();
    if evals.is_empty() {
        let mut out = native;
        out.extend(groups.into_iter().flatten());
        return out;
    }
    if groups.len() != evals.len() {
        groups = vec![groups.into_iter().flatten().collect()];
    }
    let mut groups = groups.into_iter();
    let mut out = Vec::with_capacity(native.len());
    for (i, f) in native.into_iter().enumerate() {
        if evals.contains(&i) {
            out.extend(groups.next().unwrap_or_default());
        } else {
            out.push(f);
        }
    }
    out
}
