//! Interpreter frames in a native stack: each frame a runtime resolved
//! becomes a report frame, and the frames of each C-level eval call go in
//! place of the native eval frame that ran them.

use super::*;

/// The report frame for a runtime's frame. A frame that could not be read
/// stays a native-kind marker with the reason: never a guess.
pub(super) fn interp_frame(f: &RuntimeFrame) -> Frame {
    match f {
        RuntimeFrame::Code {
            function,
            file,
            line,
            language,
        } => Frame {
            function: Some(function.clone()),
            module: None,
            file: Some(file.clone()),
            line: *line,
            kind: frame_kind(*language),
            inlined: false,
            offset: None,
        },
        RuntimeFrame::Marker { text, offset } => Frame::marker(text.clone(), *offset),
    }
}

/// Put interpreter frames (innermost first, with their entry flags) in
/// place of the native eval-loop frames (named `eval`) that ran them.
///
/// Each C-level call of the eval loop runs the interpreter frames from
/// one entry frame inwards (Python 3.11+ run Python-to-Python calls in
/// the same C call; 3.8-3.10 make every frame an entry frame), so group `k`
/// (ending at the `k`-th entry frame) replaces the `k`-th eval frame.
/// When the counts disagree (a native walk cut short, an entry flag
/// unread) every interpreter frame goes in place of the
/// innermost eval frame and the other eval frames are dropped: the order
/// of the interpreter frames is still right, only their interleaving with C
/// frames between eval calls is lost. Without any eval frame (its symbol
/// unknown) they go after the native frames. `tail` (a truncation marker)
/// follows the outermost interpreter frame.
pub fn merge_interp(
    native: Vec<Frame>,
    interp: Vec<(Frame, bool)>,
    tail: Option<Frame>,
    eval: &str,
) -> Vec<Frame> {
    if interp.is_empty() && tail.is_none() {
        return native;
    }
    let mut groups: Vec<Vec<Frame>> = Vec::new();
    let mut cur = Vec::new();
    for (f, entry) in interp {
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
        .filter(|(_, f)| !f.inlined && f.function.as_deref() == Some(eval))
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
