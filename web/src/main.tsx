// Entry point.

import { render } from "preact";
import { App } from "./ui/App";
import "./styles.css";

const saved = (() => {
  try {
    return localStorage.getItem("ccm-theme");
  } catch {
    return null;
  }
})();
document.documentElement.dataset.theme = saved ?? (window.matchMedia?.("(prefers-color-scheme: dark)").matches ? "dark" : "light");

const root = document.getElementById("app");
if (root) render(<App />, root);
