// Keyboard navigation through lists of rows or cards: every item is focusable (Tab reaches
// it), ArrowDown / ArrowUp move to the next / previous item, Home / End to the first / last,
// Enter opens it.

const MOVES = {ArrowDown: (i) => i + 1, ArrowUp: (i) => i - 1, Home: () => 0,
  End: (i, n) => n - 1};

function onKey(event, items, onOpen) {
  const i = items.indexOf(event.target);
  if (i < 0) return;
  if (event.key in MOVES) {
    const next = MOVES[event.key](i, items.length);
    items[Math.max(0, Math.min(items.length - 1, next))].focus();
    event.preventDefault();
  } else if (event.key === "Enter" && onOpen) {
    onOpen(items[i]);
    event.preventDefault();
  }
}

// A fixed list of items (a table's rows).
export function navigable(items, onOpen) {
  for (const item of items) {
    item.tabIndex = 0;
    item.addEventListener("keydown", (event) => onKey(event, items, onOpen));
  }
}

// Items matching `selector` inside `container`, now and added later (one listener).
export function navigableWithin(container, selector, onOpen) {
  container.addEventListener("keydown", (event) =>
    onKey(event, [...container.querySelectorAll(selector)], onOpen));
}

// Whether a key press belongs to a form control (and should not be taken as a shortcut).
export function typingIn(event) {
  const tag = event.target && event.target.tagName;
  return tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || tag === "BUTTON";
}
