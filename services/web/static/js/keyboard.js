// Keyboard navigation through lists of rows or cards: every item is focusable (Tab reaches
// it), ArrowDown / ArrowUp move to the next / previous item, Home / End to the first / last,
// Enter opens it.

export function navigable(items, onOpen) {
  items.forEach((item, i) => {
    item.tabIndex = 0;
    item.addEventListener("keydown", (event) => {
      if (event.target !== item) return;
      const moves = {ArrowDown: i + 1, ArrowUp: i - 1, Home: 0, End: items.length - 1};
      if (event.key in moves) {
        const next = items[Math.max(0, Math.min(items.length - 1, moves[event.key]))];
        next.focus();
        event.preventDefault();
      } else if (event.key === "Enter" && onOpen) {
        onOpen(item);
        event.preventDefault();
      }
    });
  });
}

// Whether a key press belongs to a form control (and should not be taken as a shortcut).
export function typingIn(event) {
  const tag = event.target && event.target.tagName;
  return tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || tag === "BUTTON";
}
